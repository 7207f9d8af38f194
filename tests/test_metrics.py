"""Analytic FLOPs against torch's FlopCounterMode, ROUGE on hand-computable strings, memory.

FlopCounterMode counts matmuls only (aten.mm/addmm for linear layers, aten.bmm for eager
attention's QK^T and attention-times-V), as `count_flops` does, so the two can agree exactly,
op by op. One definition differs and is aligned explicitly: eager attention multiplies the
whole n x (start + n) score rectangle of an n-token step and then masks its upper triangle,
n(n-1)/2 pairs per layer that `count_flops` leaves out as not attended. The tests compute
those masked pairs independently from the step sizes and add them back to compare.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lsbench.backend.early_exit import EarlyExitModel, EvalCounts
from lsbench.backend.kv_cache import crop_cache
from lsbench.engine.generation import DecodingConfig, Generation
from lsbench.engine.hf_reference import CountingHooks
from lsbench.engine.strategies import generate_ar, generate_speculative
from lsbench.scenario.accounting import (
    FlopModel,
    count_flops,
    peak_memory_delta,
    start_memory_window,
    weight_bytes,
)
from lsbench.scenario.quality import rouge_scores
from tests.conftest import replay_deferrals, tiny_model

# Tiny Llamas spanning layer counts, MHA/GQA/MQA, hidden sizes, tied and untied heads, and a
# head_dim that is not hidden / heads.
CONFIGS = {
    "gqa-untied": dict(num_layers=2, hidden=32),
    "mha-tied": dict(num_layers=3, hidden=48, num_attention_heads=6, num_key_value_heads=6,
                     tie_word_embeddings=True),
    "mqa-wide": dict(num_layers=5, hidden=64, num_attention_heads=8, num_key_value_heads=1),
    "head-dim": dict(num_layers=4, hidden=32, head_dim=16, intermediate_size=80),
}
PROMPT = [5, 9, 14, 3, 22, 40, 61, 7, 30, 12, 65, 70]
# The unaligned gap to FlopCounterMode's total is exactly the masked triangles: 0.7-3.6% on
# these tiny models and 12-token prompts, shrinking as context grows relative to step size.
RAW_GAP_BOUND = 0.05


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Intra-op threads only add wake-up latency on tensors this small (10 ms per softmax on a
    # busy 2-core box, against 5 us on one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def eager_model(name: str, seed: int = 0) -> EarlyExitModel:
    return EarlyExitModel(tiny_model(seed=seed, attn_implementation="eager", **CONFIGS[name]))


def measure(fn) -> tuple[int, dict[str, int]]:
    """Run fn under FlopCounterMode: (total FLOPs, FLOPs per aten op)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), per_op


def masked(n: int) -> int:
    """Query-key pairs an n-token causal step computes densely but masks out, per layer."""
    return n * (n - 1) // 2


def check_agreement(fm: FlopModel, counts: EvalCounts, total: int, per_op: dict[str, int],
                    masked_pairs: int) -> float:
    """Assert op-by-op agreement; return count_flops' relative gap to the raw counter total."""
    assert set(per_op) <= {"aten.mm", "aten.addmm", "aten.bmm"}, per_op  # nothing else counted
    zeros = [0] * len(counts.layer_tokens)
    linear = count_flops(fm, EvalCounts(counts.layer_tokens, zeros, zeros, 0, counts.head_tokens))
    attention = count_flops(fm, EvalCounts(zeros, counts.attn_pairs, zeros))
    assert per_op.get("aten.mm", 0) + per_op.get("aten.addmm", 0) == linear
    assert per_op["aten.bmm"] == attention + masked_pairs * fm.attn_pair_flops
    flops = count_flops(fm, counts)
    assert flops == linear + attention
    assert flops == total - masked_pairs * fm.attn_pair_flops
    return (total - flops) / total


def add(a: EvalCounts, b: EvalCounts) -> EvalCounts:
    return EvalCounts([x + y for x, y in zip(a.layer_tokens, b.layer_tokens, strict=True)],
                      [x + y for x, y in zip(a.attn_pairs, b.attn_pairs, strict=True)],
                      [x + y for x, y in zip(a.layer_calls, b.layer_calls, strict=True)],
                      a.embed_tokens + b.embed_tokens, a.head_tokens + b.head_tokens)


# --- FlopModel ------------------------------------------------------------------------------

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # biased q/k/v
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),  # head_dim defaults to 128, not hidden/heads
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),  # fused qkv_proj and gate_up_proj
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(head_dim=12)),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_flop_model_matches_weight_shapes(arch):
    # Bias-free matmul FLOPs per token are 2 x the weight-matrix entries it meets.
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**TINY, **extra)
    model = model_cls(config)
    fm = FlopModel.from_config(config)
    layer = model.model.layers[0]
    matrices = sum(p.numel() for n, p in layer.named_parameters() if n.endswith("proj.weight"))
    assert fm.layer_token_flops == 2 * matrices
    assert fm.head_token_flops == 2 * model.lm_head.weight.numel()
    assert fm.num_layers == 2
    assert fm.attn_pair_flops == 4 * fm.head_dim * 4


def test_flop_model_llama_7b_shapes():
    fm = FlopModel.from_config(LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                           num_attention_heads=32, num_key_value_heads=32,
                                           num_hidden_layers=32, vocab_size=32000))
    assert (fm.head_dim, fm.mlp_matrices) == (128, 3)
    # 4 h^2 attention + 3 h i MLP weights: 202.4M per layer, 2 FLOPs each.
    assert fm.layer_token_flops == 2 * (4 * 4096**2 + 3 * 4096 * 11008)
    counts = EvalCounts([1] * 32, [1] * 32, [1] * 32, embed_tokens=1, head_tokens=1)
    # One token attending itself: 2 FLOPs per non-embedding weight (~13.2 GFLOPs) plus QK^T, AV.
    params = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    assert count_flops(fm, counts) == 2 * params + 32 * 4 * 128 * 32


def test_count_flops_is_linear_and_ignores_embeddings():
    fm = FlopModel(hidden=8, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4,
                   vocab=10, num_layers=2, mlp_matrices=3)
    # q 8x8, k and v 8x4, o 8x8, MLP 3 x 8x16 multiply-accumulates per layer-token.
    assert fm.layer_token_flops == 2 * (64 + 2 * 32 + 64 + 3 * 128)
    assert fm.attn_pair_flops == 2 * 2 * 4 * 2
    assert fm.head_token_flops == 2 * 8 * 10
    counts = EvalCounts([3, 1], [6, 1], [1, 1], embed_tokens=100, head_tokens=2)
    expected = 4 * fm.layer_token_flops + 7 * fm.attn_pair_flops + 2 * fm.head_token_flops
    assert count_flops(fm, counts) == expected
    assert count_flops(fm, EvalCounts.zeros(2)) == 0.0


# --- count_flops against FlopCounterMode ---------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_plain_forward_matches_flop_counter(name):
    """transformers' own forward over a prompt, then a 4-token continuation on its cache."""
    ee = eager_model(name)
    fm = FlopModel.from_config(ee.config)
    cache = DynamicCache()
    prompt, more = torch.tensor([PROMPT]), torch.tensor([[8, 16, 24, 32]])

    def forward():
        ee.model(prompt, cache=cache, use_cache=True)
        ee.model(more, cache=cache, use_cache=True)

    with CountingHooks(ee):
        total, per_op = measure(forward)
    counts = ee.counts
    assert counts.head_tokens == len(PROMPT) + 4  # logits for every position
    gap = check_agreement(fm, counts, total, per_op,
                          fm.num_layers * (masked(len(PROMPT)) + masked(4)))
    assert 0 < gap < RAW_GAP_BOUND


@pytest.mark.parametrize("name", CONFIGS)
def test_layer_ranges_match_flop_counter(name):
    """The adapter driven as the self-speculative loop drives it: full prefill, shallow
    drafting steps, a multi-token verification over the deep layers, rollback, again."""
    ee = eager_model(name)
    fm = FlopModel.from_config(ee.config)
    n_layers, exit_layer = ee.num_layers, ee.num_layers // 2
    cache = ee.new_cache()
    deep_steps: list[int] = []

    def draft_and_verify(pending: int, k: int) -> None:
        exit_hidden, token = [], pending
        for _ in range(k):
            hidden = ee.run_layers(ee.embed(torch.tensor([[token]])), cache, 0, exit_layer)
            token = int(ee.logits(hidden)[0, -1].argmax())
            exit_hidden.append(hidden)
        shallow = ee.run_layers(ee.embed(torch.tensor([[token]])), cache, 0, exit_layer)
        deep = torch.cat([*exit_hidden, shallow], dim=1)
        deep_steps.append(deep.shape[1])
        ee.logits(ee.run_layers(deep, cache, exit_layer, n_layers))

    def run():
        hidden = ee.run_layers(ee.embed(torch.tensor([PROMPT])), cache, 0, n_layers)
        ee.logits(hidden[:, -1:])
        draft_and_verify(7, 3)
        crop_cache(cache, len(PROMPT) + 1)  # one draft accepted
        draft_and_verify(11, 2)
        crop_cache(cache, len(PROMPT) + 4)  # all accepted
        draft_and_verify(13, 4)

    total, per_op = measure(run)
    counts = ee.counts
    # Shallow layers: k drafts + the last token's pass per round; deep: k + 1 verified tokens.
    assert counts.layer_tokens == [len(PROMPT) + 4 + 3 + 5] * n_layers
    masked_pairs = (n_layers * masked(len(PROMPT))
                    + (n_layers - exit_layer) * sum(masked(n) for n in deep_steps))
    gap = check_agreement(fm, counts, total, per_op, masked_pairs)
    assert 0 < gap < RAW_GAP_BOUND


def generation_counts(gen: Generation) -> EvalCounts:
    assert gen.prefill_counts is not None and gen.decode_counts is not None
    return add(gen.prefill_counts, gen.decode_counts)


@pytest.mark.parametrize("name", ["gqa-untied", "mqa-wide"])
def test_generate_ar_matches_flop_counter(name):
    ee = eager_model(name)
    fm = FlopModel.from_config(ee.config)
    cfg = DecodingConfig(max_new_tokens=12)
    result: list[Generation] = []
    total, per_op = measure(lambda: result.append(generate_ar(ee, PROMPT, cfg)))
    gen = result[0]
    assert len(gen.tokens) == 12
    counts = generation_counts(gen)
    assert counts.head_tokens == 12  # prefill keeps only the last position's logits
    gap = check_agreement(fm, counts, total, per_op, fm.num_layers * masked(len(PROMPT)))
    assert 0 < gap < RAW_GAP_BOUND


@pytest.mark.parametrize(("name", "do_sample"), [("gqa-untied", False), ("mha-tied", True),
                                                 ("mqa-wide", False), ("head-dim", True)])
def test_generate_speculative_matches_flop_counter(name, do_sample):
    ee = eager_model(name)
    fm = FlopModel.from_config(ee.config)
    exit_layer = max(1, ee.num_layers // 2)
    cfg = DecodingConfig(max_new_tokens=16, do_sample=do_sample, temperature=0.8, seed=3)
    result: list[Generation] = []
    total, per_op = measure(
        lambda: result.append(generate_speculative(ee, PROMPT, cfg, 3, exit_layer=exit_layer)))
    gen = result[0]
    assert len(gen.tokens) == 16 and gen.drafted
    # The deep layers verify d+1 tokens at once, or d when the last draft is deferred.
    deferred = replay_deferrals(gen, exit_layer, fm.num_layers)
    deep_steps = [d + (not defer) for d, defer in zip(gen.drafted, deferred, strict=True)]
    masked_pairs = (fm.num_layers * masked(len(PROMPT))
                    + (fm.num_layers - exit_layer) * sum(masked(n) for n in deep_steps))
    gap = check_agreement(fm, generation_counts(gen), total, per_op, masked_pairs)
    assert 0 < gap < RAW_GAP_BOUND


def test_early_exit_costs_less_per_drafted_token():
    # Guards the accounting's point: a layer-E draft pays E layers, not all of them.
    ee = eager_model("mqa-wide")
    fm = FlopModel.from_config(ee.config)
    cache = ee.new_cache()
    ee.run_layers(ee.embed(torch.tensor([PROMPT])), cache, 0, ee.num_layers)
    before = ee.counts.copy()
    ee.logits(ee.run_layers(ee.embed(torch.tensor([[4]])), cache, 0, 2))
    shallow = count_flops(fm, ee.counts.minus(before))
    start = len(PROMPT)
    assert shallow == (2 * fm.layer_token_flops + 2 * (start + 1) * fm.attn_pair_flops
                       + fm.head_token_flops)


# --- ROUGE ----------------------------------------------------------------------------------

def test_rouge_identical_and_disjoint():
    assert rouge_scores("the news said it", "the news said it") == {
        "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge_scores("alpha beta gamma", "delta epsilon") == {
        "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_partial_overlap_by_hand():
    scores = rouge_scores("the quick brown fox", "the quick red fox")
    # Unigrams: 3 of 4 shared both ways. Bigrams: only "the quick", 1 of 3. LCS "the quick fox".
    assert scores["rouge1"] == pytest.approx(3 / 4)
    assert scores["rouge2"] == pytest.approx(1 / 3)
    assert scores["rougeL"] == pytest.approx(3 / 4)
    # Unequal lengths: P = 2/2, R = 2/4, F = 2PR / (P + R) = 2/3.
    assert rouge_scores("cat sat", "the cat sat down")["rouge1"] == pytest.approx(2 / 3)


def test_rouge_uses_stemmer():
    assert rouge_scores("cats running", "cat runs")["rouge1"] == 1.0


@pytest.mark.parametrize("reference", [None, "", "   "])
def test_rouge_without_reference_is_nan(reference):
    scores = rouge_scores("anything at all", reference)
    assert set(scores) == {"rouge1", "rouge2", "rougeL"}
    assert all(math.isnan(v) for v in scores.values())


def test_rouge_empty_prediction_scores_zero():
    assert rouge_scores("", "some reference") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


# --- memory ---------------------------------------------------------------------------------

def test_cpu_has_no_per_run_peak_memory():
    """No process-lifetime RSS passed off as a per-run figure: CPU rows get null."""
    before = start_memory_window("cpu")
    assert before is None and peak_memory_delta("cpu", before) is None


def test_weight_bytes_counts_tied_weights_once():
    model = torch.nn.Linear(10, 4, bias=True).to(torch.bfloat16)
    assert weight_bytes(model) == (10 * 4 + 4) * 2
    tied = torch.nn.Sequential(torch.nn.Embedding(8, 3), torch.nn.Linear(3, 8, bias=False))
    tied[1].weight = tied[0].weight
    assert weight_bytes(tied) == 8 * 3 * 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_delta_tracks_the_runs_own_allocations():
    held = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # not the run's
    before = start_memory_window("cuda")
    block = torch.empty(32 * 2**20, dtype=torch.uint8, device="cuda")
    delta = peak_memory_delta("cuda", before)
    assert block.numel() <= delta < block.numel() + held.numel()
    del block, held


# --- agreement with the baseline -----------------------------------------------------------

@pytest.mark.parametrize(("output", "reference", "position", "share"), [
    ([1, 2, 3], [1, 2, 3], -1, 1.0),
    ([1, 9, 3], [1, 2, 3], 1, 2 / 3),
    ([7, 2, 3], [1, 2, 3], 0, 2 / 3),
    ([1, 2], [1, 2, 3], 2, 1.0),  # a strict prefix differs at the first missing token
    ([1, 2, 3, 4], [1, 2, 3], 3, 1.0),
])
def test_first_mismatch_and_agreement(output, reference, position, share):
    from lsbench.scenario.quality import agreement, first_mismatch

    assert first_mismatch(output, reference) == position
    assert agreement(output, reference) == pytest.approx(share)


def test_agreement_of_an_empty_output_is_nan():
    from lsbench.scenario.quality import agreement

    assert math.isnan(agreement([], [1, 2]))
