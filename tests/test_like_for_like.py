"""Issue 9: like-for-like numbers. transformers' references decode with lsbench's settings
whatever the checkpoint says; acceptance counts stop at stop tokens; padded vocabularies."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.hf_reference import _neutral_models, neutral_generation_config
from lsbench.engine.strategies import generate
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


@pytest.mark.parametrize("k", [2, 4])
def test_hf_early_exit_drafter_keeps_its_cache(opinionated, k):
    """generate() fills a None knob from the model's own config; the neutral config placed
    there must not carry assistant_early_exit, or every drafting call becomes an assisted
    generate() of its own and re-reads the whole prompt through the shallow layers."""
    prompt = list(range(5, 45))
    gen = generate("hf-early-exit", opinionated, prompt, DecodingConfig(max_new_tokens=16), k=k,
                   exit_layer=1)
    counts = gen.decode_counts
    rounds = counts.layer_calls[-1]  # one verification forward through the last layer a round
    # The shallow layer sees the verified tokens plus at most k + 1 drafting inputs a round.
    assert counts.layer_tokens[0] <= counts.layer_tokens[-1] + rounds * (k + 1)


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


# --- stop tokens inside drafts ----------------------------------------------------------------

def _speculative_runs(target: EarlyExitModel):
    same = EarlyExitModel(target.model)  # the target as its own draft: every draft accepted
    other = EarlyExitModel(tiny_model(seed=1, num_layers=2))
    for k in (2, 5):
        for e in range(1, target.num_layers + 1):
            yield f"layerskip E={e} k={k}", dict(strategy="layerskip", k=k, exit_layer=e)
        yield f"spec same k={k}", dict(strategy="spec", k=k, draft=same)
        yield f"spec other k={k}", dict(strategy="spec", k=k, draft=other)


@pytest.mark.parametrize("stop_at", [2, 6, 11])
def test_drafting_stops_at_stop_tokens_and_counts_add_up(target, stop_at):
    free = generate("ar", target, PROMPT, DecodingConfig(max_new_tokens=24)).tokens
    stop = free[stop_at]  # a token the model really emits
    expected = free[: free.index(stop) + 1]
    cfg = DecodingConfig(max_new_tokens=24, stop_token_ids=(stop,))
    assert generate("ar", target, PROMPT, cfg).tokens == expected
    cut_rounds = 0
    for name, kw in _speculative_runs(target):
        gen = generate(kw.pop("strategy"), target, PROMPT, cfg, **kw)
        assert gen.tokens == expected, name
        k = kw["k"]
        assert all(0 <= a <= d <= k for d, a in zip(gen.drafted, gen.accepted, strict=True))
        # decode_tokens = sum(accepted) + rounds, minus one when the final round ended on an
        # accepted stop draft (no bonus token after it)
        cut = sum(gen.accepted) + len(gen.drafted) - gen.decode_tokens
        assert cut in (0, 1), name
        if cut:
            assert gen.accepted[-1] == gen.drafted[-1] > 0, name
        if name.startswith(("layerskip E=4", "spec same")):  # every draft is accepted here
            assert gen.drafted == _full_acceptance_rounds(len(expected) - 1, k), name
            assert gen.accepted == gen.drafted, name
        cut_rounds += cut
    assert cut_rounds > 0  # the stop token did land inside drafts


def _full_acceptance_rounds(decode_tokens: int, k: int) -> list[int]:
    """Drafts per round when every draft is accepted and the last decode token is a stop
    token: k drafts + a bonus per round, and the round that reaches the stop drafts up to it."""
    rounds, left = [], decode_tokens
    while left > 0:
        if left <= k:  # the stop token is drafted: drafting ends there, no bonus token
            rounds.append(left)
            break
        rounds.append(k)
        left -= k + 1
    return rounds


# --- padded vocabularies ----------------------------------------------------------------------

def test_padded_lm_heads_pair_with_one_tokenizer(tiny_model_dir, tmp_path):
    """A target whose LM head is padded past the tokenizer (like Qwen2.5 7B against 0.5B) and
    an unpadded draft with the same tokenizer: speculation works and equals ar."""
    from lsbench.results.store import ResultStore
    from lsbench.scenario.jobs import compare_job
    from lsbench.scenario.runner import run_job
    from tests.conftest import VOCAB_WORDS, tiny_tokenizer
    from tests.test_runner import job_settings, save_truncated, write_jsonl

    padded = tmp_path / "padded"
    tiny_model(seed=0, dtype=torch.float32, num_layers=4,
               vocab_size=len(VOCAB_WORDS) + 12).save_pretrained(padded)
    tiny_tokenizer().save_pretrained(padded)
    draft = save_truncated(tiny_model_dir, tmp_path / "draft", 2)  # unpadded: 84 rows
    data = write_jsonl(tmp_path / "a.jsonl")
    job = compare_job(job_settings(padded, data, compare__drafts=[str(draft)],
                                   compare__early_exit="2", compare__num_speculations="3"), 4)
    store = ResultStore(tmp_path / "p.parquet")
    run_job(job, store)
    # transformers' early exit on the padded target too (its padded rows suppressed)
    hf = compare_job(job_settings(padded, data, compare__early_exit="2",
                                  compare__num_speculations="3", compare__hf_reference=True), 4)
    run_job(hf, store)
    df = store.rows()
    assert set(df.strategy) == {"ar", "hf-ar", "spec", "layerskip", "hf-early-exit"}
    ar = {r.example_id: list(r.output_ids) for r in df[df.strategy == "ar"].itertuples()}
    for r in df.itertuples():
        assert list(r.output_ids) == ar[r.example_id], r.strategy
        assert max(r.output_ids) < len(VOCAB_WORDS)  # padded rows are never emitted


def test_logits_are_sliced_to_the_tokenizer_and_hf_assisted_refuses_padded_pairs():
    from lsbench.errors import LsbenchError

    padded = tiny_model(seed=0, num_layers=4, vocab_size=96)
    target = EarlyExitModel(padded, vocab_size=84)
    assert target.vocab_size == 84
    hidden = torch.zeros(1, 1, padded.config.hidden_size, dtype=torch.float64)
    assert target.logits(hidden).shape[-1] == 84
    assert EarlyExitModel(padded).vocab_size == 96  # no tokenizer known: every head row
    draft = EarlyExitModel(tiny_model(seed=1, num_layers=2), vocab_size=84)
    ar = generate("ar", target, PROMPT, GREEDY).tokens
    assert generate("spec", target, PROMPT, GREEDY, k=3, draft=draft).tokens == ar
    assert generate("hf-ar", target, PROMPT, GREEDY).tokens == ar
    with pytest.raises(LsbenchError, match="hf-assisted needs LM heads of one size"):
        generate("hf-assisted", target, PROMPT, GREEDY, k=3, draft=draft)
