"""hf-ar-compiled (transformers' generate() with its static cache and torch.compile) and the
hf-* counting hooks, which count from shapes and never read a device value."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.engine import hf_reference
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.hf_reference import STATIC_CACHE_BUCKET, _cached_length
from lsbench.engine.strategies import STRATEGIES, generate
from tests.conftest import tiny_model

PROMPT = [1, 5, 9, 14, 20, 33, 7, 41]
GREEDY = DecodingConfig(max_new_tokens=12)


def _counts(gen):
    return [(c.layer_tokens, c.layer_calls, c.attn_pairs, c.head_tokens, c.head_calls,
             c.embed_tokens) for c in (gen.prefill_counts, gen.decode_counts)]


def test_hooks_take_positions_from_the_cache_without_reading_device_memory():
    cache = DynamicCache()
    # meta tensors have shapes but no data: any read of their values would raise
    keys = torch.empty(1, 2, 7, 8, device="meta")
    cache.update(keys, keys.clone(), 0)
    assert _cached_length({"cache": cache}, 0) == 7
    assert _cached_length({"past_key_values": cache}, 0) == 7
    assert _cached_length({"cache": cache}, 3) is None and _cached_length({}, 0) is None


@pytest.mark.parametrize("strategy,extra", [
    ("hf-ar", {}), ("hf-early-exit", {"k": 3, "exit_layer": 2}), ("hf-pld", {"k": 3}),
    ("hf-assisted", {"k": 3, "draft": "draft"})])
def test_positions_from_cache_lengths_count_what_position_ids_say(target, monkeypatch,
                                                                    strategy, extra):
    # The hooks' fallback reads position_ids (a device read); with rolled-back drafts
    # (hf-early-exit, hf-pld, hf-assisted) the cache lengths must give the same positions.
    if extra.get("draft"):
        extra = {**extra, "draft": EarlyExitModel(
            tiny_model(seed=1, num_layers=2, dtype=target.dtype).to(target.device))}
    prompt = PROMPT + PROMPT[1:4]  # a repeated n-gram: prompt lookup drafts
    cfg = DecodingConfig(max_new_tokens=20)
    counts = _all_counts(generate(strategy, target, prompt, cfg, **extra))
    monkeypatch.setattr(hf_reference, "_cached_length", lambda kwargs, i: None)
    assert _all_counts(generate(strategy, target, prompt, cfg, **extra)) == counts


def _all_counts(gen):
    return [(c.layer_tokens, c.layer_calls, c.attn_pairs) for c in (
        gen.prefill_counts, gen.decode_counts, gen.draft_prefill_counts, gen.draft_decode_counts)
        if c is not None]


def test_hf_ar_is_counted_as_lsbenchs_ar(target):
    ar, hf = generate("ar", target, PROMPT, GREEDY), generate("hf-ar", target, PROMPT, GREEDY)
    assert hf.tokens == ar.tokens
    assert _counts(hf) == _counts(ar)


def test_hf_ar_compiled_decodes_and_counts_as_ar(target):
    assert "hf-ar-compiled" in STRATEGIES
    ar = generate("ar", target, PROMPT, GREEDY)
    hf = generate("hf-ar", target, PROMPT, GREEDY)
    first = generate("hf-ar-compiled", target, PROMPT, GREEDY)  # compiles
    graphs = dict(counters["stats"])
    again = generate("hf-ar-compiled", target, PROMPT[:-2], GREEDY)
    assert dict(counters["stats"]) == graphs  # another prompt length, the same graph
    assert first.compiled and not hf.compiled
    assert first.tokens == ar.tokens
    assert again.tokens == generate("ar", target, PROMPT[:-2], GREEDY).tokens
    assert _counts(first) == _counts(hf)
    assert first.decode_tokens == hf.decode_tokens == len(ar.tokens) - 1
    assert sum(first.step_tokens) == first.decode_tokens
    # committed bytes as hf-ar's dynamic cache holds them; the storage is the whole bucket
    assert first.kv_cache_bytes == hf.kv_cache_bytes > 0
    per_position = hf.kv_cache_bytes // (len(PROMPT) + len(hf.tokens) - 1)
    assert first.kv_cache_capacity_bytes == per_position * STATIC_CACHE_BUCKET


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hf_ar_compiled_on_cuda_uses_generates_own_compile():
    # On CUDA transformers compiles by its own criteria (CUDA graphs, reduce-overhead); the
    # tokens and counts must be those of lsbench's ar on the same device.
    model = EarlyExitModel(tiny_model(seed=0, num_layers=4, dtype=torch.float32).to("cuda"))
    ar = generate("ar", model, PROMPT, GREEDY)
    for _ in range(2):  # the second call runs the captured graphs
        gen = generate("hf-ar-compiled", model, PROMPT, GREEDY)
        assert gen.compiled and gen.tokens == ar.tokens
        assert _counts(gen) == _counts(ar)
