"""Batched decoding is exact per row: every row of a static batch (ragged, left-padded
prompts; rows stopping at their own stop token or budget) reproduces its batch-1 run, and the
batch's accounting counts every forward over B rows x T tokens."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.backend.kv_cache import StaticKVCache, capacity_for
from lsbench.engine.batch import BATCHED_STRATEGIES, generate_batch
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.strategies import generate, generate_speculative
from lsbench.errors import LsbenchError
from tests.conftest import VOCAB_WORDS, tiny_model

MAX_NEW = 14


@pytest.fixture(scope="module")
def model() -> EarlyExitModel:
    return EarlyExitModel(tiny_model(seed=0, num_layers=4, dtype=torch.float32))


@pytest.fixture(scope="module")
def draft() -> EarlyExitModel:
    return EarlyExitModel(tiny_model(seed=7, num_layers=2, dtype=torch.float32))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Ragged prompts (3..17 tokens), each repeating a short phrase so prompt lookup drafts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(4, len(VOCAB_WORDS)) for _ in range(rng.randrange(2, 5))]
        text = (phrase * 6)[: rng.randrange(3, 18)]
        out.append([1, *text])
    return out


RUNS = {  # strategy, kwargs
    "ar": ("ar", {}),
    "exit-2": ("exit", {"exit_layer": 2}),
    "layerskip-1-k3": ("layerskip", {"exit_layer": 1, "k": 3}),
    "layerskip-2-k1": ("layerskip", {"exit_layer": 2, "k": 1}),
    "layerskip-3-k4": ("layerskip", {"exit_layer": 3, "k": 4}),
    "layerskip-4-k2": ("layerskip", {"exit_layer": 4, "k": 2}),
    "pld-k3": ("pld", {"k": 3}),
    "spec-k3": ("spec", {"k": 3}),
}


def stop_config(model: EarlyExitModel, batch: list[list[int]]) -> DecodingConfig:
    """A stop token that some rows emit early (the third token of row 0's greedy output)."""
    first = generate("ar", model, batch[0], DecodingConfig(max_new_tokens=MAX_NEW)).tokens
    return DecodingConfig(max_new_tokens=MAX_NEW, stop_token_ids=(first[2],))


@pytest.mark.parametrize("size", [1, 3, 8])
@pytest.mark.parametrize("run", sorted(RUNS))
def test_every_row_equals_its_batch_1_run(model, draft, run, size):
    strategy, kw = RUNS[run]
    kw = {**kw, "draft": draft} if strategy == "spec" else kw
    batch = prompts(size, seed=size)
    for cfg in (DecodingConfig(max_new_tokens=MAX_NEW), stop_config(model, batch)):
        out = generate_batch(strategy, model, batch, cfg, **kw)
        assert len(out.rows) == size
        for b, (prompt, row) in enumerate(zip(batch, out.rows, strict=True)):
            alone = generate(strategy, model, prompt, cfg, **kw)
            reference = alone if strategy == "exit" else generate("ar", model, prompt, cfg)
            assert row.tokens == reference.tokens, (run, size, b)
            assert (row.drafted, row.accepted) == (alone.drafted, alone.accepted), (run, b)
            assert sum(row.step_tokens) == row.decode_tokens == len(row.tokens) - 1
            assert len(row.step_end_s) == (len(row.drafted) if row.drafted
                                           else row.decode_tokens)
            assert row.step_end_s == sorted(row.step_end_s)
            assert row.decode_s <= out.decode_s
        assert max(r.decode_s for r in out.rows) <= out.decode_s


def test_rows_stop_on_their_own_and_acceptance_differs_within_a_batch(model):
    batch = prompts(8, seed=8)
    cfg = stop_config(model, batch)
    out = generate_batch("layerskip", model, batch, cfg, k=3, exit_layer=2)
    lengths = {len(r.tokens) for r in out.rows}
    assert len(lengths) > 1 and min(lengths) < MAX_NEW  # some rows stopped early
    assert len({tuple(r.accepted) for r in out.rows}) > 1  # rows keep their own acceptance
    assert any(r.tokens[-1] in cfg.stop_token_ids for r in out.rows)


def test_counts_have_the_batch_dimension(model):
    batch = prompts(3, seed=3)
    cfg = stop_config(model, batch)
    out = generate_batch("ar", model, batch, cfg)
    steps = max(r.decode_tokens for r in out.rows)  # the slowest row sets the batch's steps
    assert len({r.decode_tokens for r in out.rows}) > 1
    padded = max(map(len, batch))
    for row in out.rows:  # every row carries the batch's counts
        assert row.prefill_counts.layer_tokens == [3 * padded] * model.num_layers
        assert row.decode_counts.layer_tokens == [3 * steps] * model.num_layers
        assert row.decode_counts.layer_calls == [steps] * model.num_layers
        assert row.decode_counts.head_tokens == 3 * steps
    # KV bytes: each row's own committed tokens (all but its last new token); its capacity
    # share of the batch's static buffers.
    per_token = 2 * 2 * 8 * 4 * model.num_layers  # keys+values x kv heads x head dim x fp32
    for prompt, row in zip(batch, out.rows, strict=True):
        assert row.kv_cache_bytes == per_token * (len(prompt) + len(row.tokens) - 1)
        assert row.kv_cache_capacity_bytes == per_token * capacity_for(padded, MAX_NEW)


def test_rollback_is_a_length_change(model):
    seen = []

    def record(cache, committed):
        seen.append((cache.keys[0].data_ptr(), tuple(cache.keys[0].shape),
                     cache.get_seq_length(0)))
        assert all(cache.get_seq_length(i) == len(committed) - 1
                   for i in range(model.num_layers))

    cfg = DecodingConfig(max_new_tokens=MAX_NEW)
    generate_speculative(model, prompts(1)[0], cfg, 3, exit_layer=1, on_round=record)
    assert len(seen) > 3 and len({(p, s) for p, s, _ in seen}) == 1  # one buffer, one shape
    assert len({n for *_, n in seen}) == len(seen)


def test_the_cache_refuses_an_overflow(model):
    cache = StaticKVCache(model.num_layers, batch=2, capacity=8)
    hidden = model.embed(torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]))
    model.run_layers(hidden, cache, 0, model.num_layers)
    with pytest.raises(LsbenchError, match="KV cache overflow: 10 positions needed, capacity 8"):
        model.run_layers(hidden, cache, 0, model.num_layers)
    assert capacity_for(200, 48, 4) == 256 and capacity_for(220, 48, 4) == 512


@pytest.mark.parametrize("kind", [{"exit_layer": 2}, {"prompt_lookup": True}, {"draft": True}])
def test_draft_time_is_measured_in_the_device_loop(model, draft, kind):
    kind = {"draft": draft} if "draft" in kind else kind
    cfg = DecodingConfig(max_new_tokens=MAX_NEW)
    for device_loop in (False, True):
        gen = generate_speculative(model, prompts(1)[0], cfg, 3, device_loop=device_loop,
                                   **kind)
        assert gen.device_loop == device_loop
        assert math.isfinite(gen.draft_s) and 0 < gen.draft_s < gen.decode_s


def test_batched_strategies_and_refusals(model):
    assert set(BATCHED_STRATEGIES) == {"ar", "spec", "layerskip", "pld", "exit"}
    with pytest.raises(LsbenchError, match="batch 1 only"):
        generate_batch("hf-ar", model, prompts(2), DecodingConfig(max_new_tokens=4))
    with pytest.raises(LsbenchError, match="empty prompt"):
        generate_batch("ar", model, [[1, 2], []], DecodingConfig(max_new_tokens=4))


def test_batched_sampling_is_reproducible_and_rows_differ(model):
    cfg = DecodingConfig(max_new_tokens=10, do_sample=True, seed=3)
    batch = [prompts(1)[0]] * 3
    for strategy, kw in itertools.product(("ar", "layerskip"), ({"k": 2, "exit_layer": 1},)):
        a = generate_batch(strategy, model, batch, cfg, **kw)
        b = generate_batch(strategy, model, batch, cfg, **kw)
        assert [r.tokens for r in a.rows] == [r.tokens for r in b.rows]
        assert len({tuple(r.tokens) for r in a.rows}) > 1  # each row draws from its own seed


@pytest.mark.parametrize("arch", ["gemma2", "mistral-window", "qwen3", "phi3"])
def test_batches_are_exact_on_every_architecture(arch):
    """Padding meets sliding windows (Gemma-2, soft-capped, eager attention; Mistral) and each
    architecture's layer signature."""
    import transformers

    from tests.test_engine import ARCH_CONFIGS

    name = "mistral" if arch == "mistral-window" else arch
    config_cls, extra = ARCH_CONFIGS[name]
    extra = {**extra, "sliding_window": 4} if arch == "mistral-window" else extra
    config = config_cls(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, **extra)
    config._attn_implementation = "eager" if name == "gemma2" else "sdpa"
    torch.manual_seed(0)
    adapter = EarlyExitModel(
        transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval())
    batch = [[3, 7, 11, 2, 9, 30, 41, 5, 6, 8], [4, 9, 2], [12, 5, 7, 30, 1, 2]]
    cfg = DecodingConfig(max_new_tokens=10)
    for strategy, kw in (("ar", {}), ("layerskip", {"exit_layer": 1, "k": 3})):
        out = generate_batch(strategy, adapter, batch, cfg, **kw)
        for prompt, row in zip(batch, out.rows, strict=True):
            assert row.tokens == generate("ar", adapter, prompt, cfg).tokens, (arch, strategy)
