"""Shared fixtures: tiny random-weight models and a tiny tokenizer, built in the session.

Nothing here reaches a hub; float64 keeps greedy argmax free of floating-point ties, so
exact-equality assertions test the algorithm rather than rounding.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.engine.generation import DecodingConfig, Generation
from lsbench.engine.strategies import defer_last_draft, generate

# Tiny models run fastest on one thread; two threads mostly add synchronisation overhead.
torch.set_num_threads(1)

VOCAB_WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)] + [
    "the", "a", "news", "said", "on", "in", "of", "and", "to", "is", "summary", "article",
    "Article:", "Summary:", "was", "by", "for", "with", "it", "that",
]


def tiny_config(num_layers: int = 4, vocab_size: int = len(VOCAB_WORDS), hidden: int = 32,
                **overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config)).to(dtype).eval()
    # Sharpen the output distribution a little so greedy and sampled runs are not flat noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(VOCAB_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


# `make gpu-check` reruns the exactness tests that use `target` on its device and dtype.
TEST_DEVICE = os.environ.get("LSBENCH_TEST_DEVICE", "cpu")
TEST_DTYPE = getattr(torch, os.environ.get("LSBENCH_TEST_DTYPE", "float64"))


@pytest.fixture(scope="session")
def target() -> EarlyExitModel:
    return EarlyExitModel(tiny_model(seed=0, num_layers=4, dtype=TEST_DTYPE).to(TEST_DEVICE))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved fp32 tiny model + tokenizer, loadable by path like any checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model(seed=0, dtype=torch.float32, num_layers=4).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def replay_deferrals(gen: Generation, exit_layer: int, num_layers: int) -> list[bool]:
    """Per round: was the last draft left out of verification (the policy, replayed)?"""
    deferred, full = [], 0
    for rounds, (d, a) in enumerate(zip(gen.drafted, gen.accepted, strict=True)):
        deferred.append(d > 0 and (exit_layer == num_layers
                                   or defer_last_draft(full, rounds, exit_layer, num_layers)))
        full += d > 0 and a == d  # a round without drafts is not a fully accepted one
    return deferred


def assert_sampling_is_seeded_and_not_greedy(name: str, target: EarlyExitModel,
                                             prompt: list[int], max_new_tokens: int,
                                             **kwargs) -> None:
    """One seed, one output; across seeds the outputs vary and none is greedy's, which a
    silently greedy sampler would not manage."""
    greedy = generate(name, target, prompt, DecodingConfig(max_new_tokens=max_new_tokens),
                      **kwargs).tokens
    outputs = []
    for seed in range(5):
        cfg = DecodingConfig(max_new_tokens=max_new_tokens, do_sample=True, seed=seed)
        tokens = generate(name, target, prompt, cfg, **kwargs).tokens
        assert tokens == generate(name, target, prompt, cfg, **kwargs).tokens, seed
        outputs.append(tuple(tokens))
    assert len(set(outputs)) > 1
    assert tuple(greedy) not in outputs
