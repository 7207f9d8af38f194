"""The roofline columns: weight bytes read are counted from the calls actually made, and the
device's copy bandwidth is measured, positive and finite."""

from __future__ import annotations

import math

import pytest
import torch

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.strategies import generate
from lsbench.scenario.accounting import (
    WeightModel,
    count_weight_bytes,
    measure_copy_gbps,
    peak_gbps,
    roofline,
)
from tests.conftest import VOCAB_WORDS, replay_deferrals, tiny_model

PROMPT = [1, 5, 9, 17, 33, 4, 60, 12]
CFG = DecodingConfig(max_new_tokens=16)

# The tiny float64 Llama of conftest, by hand: hidden 32, intermediate 64, 4 query heads and
# 2 KV heads of width 8, no biases, 8 bytes a weight.
HIDDEN, INTER, KV_WIDTH, BYTES = 32, 64, 2 * 8, 8
LAYER_BYTES = BYTES * (HIDDEN * HIDDEN  # q_proj
                       + 2 * HIDDEN * KV_WIDTH  # k_proj, v_proj
                       + HIDDEN * HIDDEN  # o_proj
                       + 3 * HIDDEN * INTER  # gate, up, down
                       + 2 * HIDDEN)  # input and post-attention RMSNorm
HEAD_BYTES = BYTES * (len(VOCAB_WORDS) * HIDDEN + HIDDEN)  # LM head + final norm
ROW_BYTES = BYTES * HIDDEN


@pytest.fixture(scope="module")
def model() -> EarlyExitModel:
    return EarlyExitModel(tiny_model(seed=0, num_layers=4))


def read_by_calls(adapter: EarlyExitModel, run) -> tuple[object, int]:
    """(run(), the weight bytes its module calls read), counted independently of the
    adapter's EvalCounts: a forward hook on every module with weights of its own adds those
    weights' bytes per call; an embedding adds one row per looked-up id."""
    read = 0

    def hook(module, args, output):
        nonlocal read
        own = list(module.parameters(recurse=False))
        if isinstance(module, torch.nn.Embedding):
            read += args[0].numel() * module.weight[0].numel() * module.weight.element_size()
        else:
            read += sum(p.numel() * p.element_size() for p in own)

    handles = [m.register_forward_hook(hook) for m in adapter.model.modules()
               if any(True for _ in m.parameters(recurse=False))]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return result, read


def counted_bytes(adapter: EarlyExitModel, gen) -> int:
    """count_weight_bytes over the whole generation: prefill and decode."""
    wm = WeightModel.from_model(adapter)
    return (count_weight_bytes(wm, gen.prefill_counts)
            + count_weight_bytes(wm, gen.decode_counts))


def test_weight_model_is_the_parameter_bytes(model):
    wm = WeightModel.from_model(model)
    assert wm.layer_bytes == (LAYER_BYTES,) * 4
    assert wm.head_bytes == HEAD_BYTES
    assert wm.embed_row_bytes == ROW_BYTES
    total = sum(p.numel() * p.element_size() for p in model.model.parameters())
    # everything but the embedding table, which is read a row at a time
    assert sum(wm.layer_bytes) + wm.head_bytes == total - len(VOCAB_WORDS) * ROW_BYTES


def test_head_calls_count_calls_not_rows(model):
    before = model.counts.copy()
    model.logits(torch.zeros(1, 5, HIDDEN, dtype=torch.float64))
    diff = model.counts.minus(before)
    assert (diff.head_calls, diff.head_tokens) == (1, 5)


def test_ar_reads_every_weight_once_per_token(model):
    gen = generate("ar", model, PROMPT, CFG)
    n, counts = gen.decode_tokens, gen.decode_counts
    assert n == 15
    assert counts.layer_calls == [n] * 4 and counts.head_calls == n and counts.embed_tokens == n
    wm = WeightModel.from_model(model)
    assert count_weight_bytes(wm, counts) == n * (4 * LAYER_BYTES + HEAD_BYTES + ROW_BYTES)
    assert gen.prefill_counts.head_calls == 1  # the prompt's last position only


@pytest.mark.parametrize("exit_layer,k", [(1, 3), (2, 4), (3, 2)])
def test_layerskip_weight_bytes_follow_the_calls_it_made(model, exit_layer, k):
    gen, read = read_by_calls(model, lambda: generate("layerskip", model, PROMPT, CFG, k=k,
                                                      exit_layer=exit_layer))
    counts, rounds = gen.decode_counts, len(gen.drafted)
    assert counted_bytes(model, gen) == read
    # the deep layers run once per round, plus once more for the deferred last draft of a fully
    # accepted round; the shallow layers run for every draft
    late = sum(d and a == n for d, a, n in zip(replay_deferrals(gen, exit_layer, 4),
                                                gen.accepted, gen.drafted, strict=True))
    assert counts.layer_calls[exit_layer:] == [rounds + late] * (4 - exit_layer)
    assert all(c > rounds for c in counts.layer_calls[:exit_layer])
    # drafts less a deferred last one, plus at least one verification head call per round
    assert counts.head_calls >= sum(gen.drafted)
    assert counts.head_calls <= sum(gen.drafted) + 3 * rounds  # row 0, the rest, the last


def test_spec_counts_the_draft_models_weights(model):
    draft = EarlyExitModel(tiny_model(seed=7, num_layers=2))
    (gen, target_read), draft_read = read_by_calls(draft, lambda: read_by_calls(
        model, lambda: generate("spec", model, PROMPT, CFG, k=3, draft=draft)))
    dc = gen.draft_decode_counts
    assert sum(dc.layer_calls) > 0 and dc.head_calls >= sum(gen.drafted) - len(gen.drafted)
    wm = WeightModel.from_model(draft)
    assert (count_weight_bytes(wm, gen.draft_prefill_counts) + count_weight_bytes(wm, dc)
            == draft_read)
    assert counted_bytes(model, gen) == target_read


def test_transformers_hooks_count_head_calls(model):
    gen = generate("hf-ar", model, PROMPT, CFG)
    counts = gen.decode_counts
    assert counts.head_calls == counts.layer_calls[-1] == gen.decode_tokens


def test_copy_bandwidth_is_positive_and_finite():
    small = measure_copy_gbps("cpu", nbytes=8 << 20, repeats=2)
    assert small > 0 and math.isfinite(small)
    peak = peak_gbps("cpu")  # the full-size copy, in a child process
    assert peak > 0 and math.isfinite(peak)
    assert peak_gbps("cpu") == peak  # measured once per process


def test_roofline_fraction():
    achieved, fraction = roofline(3e9, 0.5, 12.0)
    assert achieved == pytest.approx(6.0) and fraction == pytest.approx(0.5)
    assert all(math.isnan(x) for x in roofline(3e9, 0.0, 12.0))
    assert all(math.isnan(x) for x in roofline(0, 1.0, 12.0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_bandwidth_and_roofline_of_a_layerskip_run():
    peak = peak_gbps("cuda")
    assert peak > 0 and math.isfinite(peak)
    model = EarlyExitModel(tiny_model(seed=0, num_layers=4).to("cuda"))
    gen, read = read_by_calls(model, lambda: generate("layerskip", model, PROMPT, CFG, k=3,
                                                      exit_layer=2))
    assert counted_bytes(model, gen) == read
