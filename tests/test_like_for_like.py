"""Issue 9: like-for-like numbers. transformers' references decode with lsbench's settings
whatever the checkpoint says; acceptance counts stop at stop tokens; padded vocabularies."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from lsbench.generation import DecodingConfig
from lsbench.hf_reference import _neutral_models, neutral_generation_config
from lsbench.models import EarlyExitModel
from lsbench.strategies import generate
from tests.conftest import tiny_model

PROMPT = [1, 5, 9, 17, 33, 4, 60, 12]
GREEDY = DecodingConfig(max_new_tokens=20)


@pytest.fixture(scope="module")
def opinionated() -> EarlyExitModel:
    """A checkpoint whose generation_config.json would change every decoder it touches."""
    model = tiny_model(seed=0, num_layers=4)
    model.generation_config = GenerationConfig(
        repetition_penalty=1.3, no_repeat_ngram_size=2, top_k=5, top_p=0.5, temperature=0.3,
        do_sample=True, min_new_tokens=20, bad_words_ids=[[7]], suppress_tokens=[8],
        sequence_bias={(9,): -5.0}, min_p=0.2, begin_suppress_tokens=[10])
    return EarlyExitModel(model)


def test_hf_references_ignore_the_checkpoints_generation_config(opinionated):
    ar = generate("ar", opinionated, PROMPT, GREEDY).tokens
    # the checkpoint's settings really do change generate()'s output when they are merged in
    with torch.inference_mode():
        merged = opinionated.model.generate(torch.tensor([PROMPT]), max_new_tokens=20,
                                            do_sample=False, pad_token_id=0)
    assert merged[0, len(PROMPT):].tolist() != ar
    assert generate("hf-ar", opinionated, PROMPT, GREEDY).tokens == ar
    for e in (1, 2, 4):
        got = generate("hf-early-exit", opinionated, PROMPT, GREEDY, k=3, exit_layer=e).tokens
        assert got == ar, f"E={e}"
    draft = EarlyExitModel(tiny_model(seed=1, num_layers=2))
    draft.model.generation_config = GenerationConfig(repetition_penalty=2.0, top_k=3)
    assert generate("hf-assisted", opinionated, PROMPT, GREEDY, k=3, draft=draft).tokens == ar
    # and the models' own configs are restored afterwards
    assert opinionated.model.generation_config.repetition_penalty == 1.3
    assert draft.model.generation_config.top_k == 3


@pytest.mark.parametrize("sampling", [
    DecodingConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0),
    DecodingConfig(do_sample=True, temperature=1.0, top_k=4, top_p=0.9),
    DecodingConfig(),
])
def test_merged_config_is_exactly_lsbenchs(opinionated, sampling):
    """What generate() ends up decoding with, after merging the checkpoint's config."""
    hf = opinionated.model
    gen_cfg = neutral_generation_config(sampling)
    with _neutral_models([hf], gen_cfg):
        merged, _ = hf._prepare_generation_config(gen_cfg)
        processors = hf._get_logits_processor(merged, input_ids_seq_length=len(PROMPT),
                                              encoder_input_ids=torch.tensor([PROMPT]))
    names = sorted(type(p).__name__ for p in processors)
    expected = []
    if sampling.do_sample:
        expected += ["TemperatureLogitsWarper"] if sampling.temperature != 1.0 else []
        expected += ["TopKLogitsWarper"] if sampling.top_k else []
        expected += ["TopPLogitsWarper"] if sampling.top_p < 1.0 else []
    assert names == sorted(expected)
    assert merged.do_sample == sampling.do_sample
