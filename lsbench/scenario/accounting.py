"""Accounting: what a generation cost, derived from the raw facts it recorded. Analytic
FLOPs and weight bytes from evaluation counts, the device's memory copy bandwidth (the
roofline's peak) and peak memory.

FLOPs are counted, not guessed: `count_flops` multiplies the work the adapter recorded
(`EvalCounts`) by per-architecture matmul costs read from the model config. The tests check it
against `torch.utils.flop_counter.FlopCounterMode` on real forward passes.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lsbench.backend.early_exit import EarlyExitModel, EvalCounts
from lsbench.engine.generation import Generation
from lsbench.errors import LsbenchError

# The copy lives in a torch-only module: peak_gbps's child process imports it without
# transformers (seconds of start-up per process). Re-exported for callers of accounting.
from lsbench.scenario.bandwidth import (  # noqa: F401
    COPY_BYTES,
    measure_copy_gbps,
    measure_matmul_gflops,
)


@dataclass(frozen=True)
class FlopModel:
    """Per-architecture matmul shapes, read from a transformers config."""

    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    num_layers: int
    mlp_matrices: int  # hidden x intermediate matrices per MLP: 3 for gated (SwiGLU/GeGLU)

    @classmethod
    def from_config(cls, config) -> FlopModel:
        # Multimodal wrappers keep the decoder's shapes in a nested text config.
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            # Gemma's head_dim is not hidden/heads; Phi3 and Qwen2 leave it unset.
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            num_layers=config.num_hidden_layers,
            # Every supported architecture (see models.SUPPORTED_ARCHITECTURES) has a gated
            # MLP: gate and up projections (Phi3 fuses them into one 2x-wide matrix) plus down.
            mlp_matrices=3,
        )

    @property
    def layer_token_flops(self) -> int:
        """Projections of one token through one decoder layer: q, k, v, o and the MLP."""
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        macs = (self.hidden * q_width  # q_proj
                + 2 * self.hidden * kv_width  # k_proj, v_proj (narrower under GQA/MQA)
                + q_width * self.hidden  # o_proj
                + self.mlp_matrices * self.hidden * self.intermediate)
        return 2 * macs

    @property
    def attn_pair_flops(self) -> int:
        """One query attending one key in one layer: a head_dim dot product for QK^T and a
        head_dim axpy for attention-times-V, in every query head (GQA shares K/V, not work)."""
        return 2 * 2 * self.head_dim * self.num_heads

    @property
    def head_token_flops(self) -> int:
        """One token through the LM head."""
        return 2 * self.hidden * self.vocab


def count_flops(fm: FlopModel, counts: EvalCounts) -> float:
    """Matmul FLOPs (2 per multiply-accumulate) of the work recorded in `counts`:

    - per layer-token: q/k/v/o projections and the gated MLP (`FlopModel.layer_token_flops`);
    - per attended query-key pair, per layer: QK^T and attention-times-V in every query head
      (4 * head_dim * num_heads). Only causally attended pairs count, as `attn_pairs` records
      them (sliding windows included): pairs a dense kernel computes and then masks out, the
      upper triangle of a multi-token step, are not useful work and are left out;
    - per head token: the LM head (2 * hidden * vocab).

    Not counted: embedding lookups (a gather, no arithmetic), and elementwise work — norms,
    activations, softmax, rotary, residual adds, bias adds, logit softcapping — which is
    O(hidden) per token against O(hidden^2) for the matmuls, and which FlopCounterMode does
    not count either.
    """
    return float(sum(counts.layer_tokens) * fm.layer_token_flops
                 + sum(counts.attn_pairs) * fm.attn_pair_flops
                 + counts.head_tokens * fm.head_token_flops)


# --- roofline: weight bytes read against the device's copy bandwidth -----------------------

@dataclass(frozen=True)
class WeightModel:
    """Bytes of weights one call reads: at batch 1 every forward through a decoder layer reads
    all of that layer's parameters, every LM-head call the final norm and the whole head, and the
    embedding reads one row per token."""

    layer_bytes: tuple[int, ...]  # per decoder layer: its parameters' bytes
    head_bytes: int  # final norm + LM head (the tied embedding matrix when tied)
    embed_row_bytes: int  # one embedding row

    @classmethod
    def from_model(cls, model: EarlyExitModel) -> WeightModel:
        def size(module: torch.nn.Module) -> int:
            return sum(p.numel() * p.element_size() for p in module.parameters())

        table = model.backbone.embed_tokens.weight
        return cls(layer_bytes=tuple(size(layer) for layer in model.backbone.layers),
                   head_bytes=size(model.backbone.norm) + size(model.model.lm_head),
                   embed_row_bytes=table.shape[1] * table.element_size())


def count_weight_bytes(wm: WeightModel, counts: EvalCounts) -> int:
    """Weight bytes read by the work in `counts`: layer calls x layer bytes, head calls x head
    bytes, embedded tokens x one row. KV-cache and activation traffic are not counted: at batch
    1 and short contexts the weights dominate."""
    return (sum(c * b for c, b in zip(counts.layer_calls, wm.layer_bytes, strict=True))
            + counts.head_calls * wm.head_bytes + counts.embed_tokens * wm.embed_row_bytes)


def peak_gbps(device: torch.device | str) -> float:
    """The roofline's peak for `device`, measured once per process. On CPU the copy runs in a
    child process with this process's thread count: a large copy here would inflate the
    process's peak RSS, which is what `peak_memory` reports on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda" and "cuda:0" are one measurement
        dev = torch.device("cuda", torch.cuda.current_device())
    return _peak_gbps(str(dev))


@functools.cache
def _peak_gbps(device: str) -> float:
    if torch.device(device).type != "cpu":
        return measure_copy_gbps(device)
    return _in_child("measure_copy_gbps('cpu')", "the CPU copy bandwidth")


def peak_gflops(device: torch.device | str, dtype: torch.dtype = torch.float32) -> float:
    """The batched roofline's compute peak for `device` in `dtype`: a large matmul's rate in
    GFLOP/s, measured once per process like `peak_gbps` (on CPU in a child process too)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _peak_gflops(str(dev), str(dtype).replace("torch.", ""))


@functools.cache
def _peak_gflops(device: str, dtype: str) -> float:
    if torch.device(device).type != "cpu":
        return measure_matmul_gflops(device, getattr(torch, dtype))
    return _in_child(f"measure_matmul_gflops('cpu', torch.{dtype})", "the CPU matmul rate")


def _in_child(call: str, what: str) -> float:
    """A `bandwidth` measurement run in a child process with this process's thread count."""
    code = (f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
            "from lsbench.scenario.bandwidth import *; "
            f"print({call})")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=300, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise LsbenchError(f"could not measure {what}: {exc}") from None


def roofline(weight_bytes: float, decode_s: float, peak: float) -> tuple[float, float]:
    """(achieved GB/s, fraction of the peak) of reading `weight_bytes` in `decode_s` seconds."""
    if not decode_s > 0 or not weight_bytes:
        return math.nan, math.nan
    achieved = weight_bytes / decode_s / 1e9
    return achieved, achieved / peak if peak > 0 else math.nan


def generation_cost(gen: Generation, target: tuple[FlopModel, WeightModel],
                    draft: tuple[FlopModel, WeightModel] | None, peak: float) -> dict[str, float]:
    """The cost columns of one generation: FLOPs counted from what the target (and the draft
    model, where one ran) evaluated, the weight bytes its decode read, and the roofline."""
    parts = [(target, gen.prefill_counts, gen.decode_counts)]
    if draft is not None and gen.draft_decode_counts is not None:
        parts.append((draft, gen.draft_prefill_counts, gen.draft_decode_counts))
    flops_prefill = sum(count_flops(fm, pre) for (fm, _), pre, _ in parts)
    flops_decode = sum(count_flops(fm, dec) for (fm, _), _, dec in parts)
    bytes_read = sum(count_weight_bytes(wm, dec) for (_, wm), _, dec in parts)
    achieved, fraction = roofline(bytes_read, gen.decode_s, peak)
    return {"flops_prefill": flops_prefill, "flops_decode": flops_decode,
            "flops_per_output_token": (flops_decode / gen.decode_tokens if gen.decode_tokens
                                       else math.nan),
            "weight_bytes_read": bytes_read, "achieved_gbps": achieved, "peak_gbps": peak,
            "roofline_fraction": fraction}


def roofline_s(weight_bytes: float, flops: float, peak: float, peak_gflops: float) -> float:
    """The roofline's time for a batch's decode: max(weight bytes / copy bandwidth, FLOPs /
    matmul peak). At batch 1 the first term rules; rows of a batch share the weight reads but
    each adds its FLOPs, so with enough rows the second takes over."""
    bounds = [x for x in (weight_bytes / (peak * 1e9) if peak > 0 else math.nan,
                          flops / (peak_gflops * 1e9) if peak_gflops > 0 else math.nan)
              if not math.isnan(x)]
    return max(bounds) if bounds else math.nan


def batch_costs(costs: list[dict], decode_tokens: list[int], batch_decode_s: float, peak: float,
                peak_gflops: float) -> list[dict]:
    """The rows' `generation_cost` columns with the batch dimension. The engine's rows each
    carry their batch's counts (every forward runs over all B rows, finished ones included:
    static batching), so the batch's FLOPs and weight bytes are any row's; each row is charged
    an equal share (batch / rows), and flops_per_output_token is the batch's FLOPs over all its
    rows' decode tokens. achieved_gbps and roofline_fraction describe the batch (the same in
    each of its rows): batch bytes / batch decode time, and the roofline's time (`roofline_s`)
    / batch decode time. A row alone is a batch of one: its columns are `generation_cost`'s."""
    n = len(costs)
    batch_bytes = max(c["weight_bytes_read"] for c in costs)
    batch_flops = max(c["flops_decode"] for c in costs)
    batch_prefill = max(c["flops_prefill"] for c in costs)
    achieved, _ = roofline(batch_bytes, batch_decode_s, peak)
    bound = roofline_s(batch_bytes, batch_flops, peak, peak_gflops)
    fraction = bound / batch_decode_s if batch_decode_s > 0 and batch_bytes else math.nan
    tokens = sum(decode_tokens)
    return [{**c, "weight_bytes_read": batch_bytes // n, "flops_decode": batch_flops / n,
             "flops_prefill": batch_prefill / n,
             "flops_per_output_token": batch_flops / tokens if tokens else math.nan,
             "achieved_gbps": achieved, "roofline_fraction": fraction,
             "peak_gflops": peak_gflops} for c in costs]


# --- memory -------------------------------------------------------------------------------

def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def start_memory_window(device: torch.device | str) -> int | None:
    """Bytes allocated now on a CUDA device, with its peak statistics reset; None elsewhere
    (the CPU has no allocator statistics, and a process-lifetime RSS says nothing per run)."""
    if not _is_cuda(device):
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory_delta(device: torch.device | str, before: int | None) -> int | None:
    """Peak bytes allocated since `start_memory_window` minus what was allocated then: what
    the run itself needed on top of the loaded models. None off CUDA."""
    if before is None or not _is_cuda(device):
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def batch_memory_bytes(model: EarlyExitModel, batch: int, capacity: int, tokens: int) -> int:
    """Device bytes one batch's decoding allocates besides the weights, before it runs: its
    static KV cache (every layer, `batch` rows x `capacity` slots; exact) and the largest
    forward's activations (`batch` x `tokens` rows through the MLP's intermediate width and
    float32 logits over the vocabulary, each held twice; an estimate on the safe side)."""
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = model.backbone.layers[0].self_attn.head_dim
    element = torch.finfo(model.dtype).bits // 8
    cache = 2 * model.num_layers * batch * kv_heads * capacity * head_dim * element
    rows = batch * tokens
    activations = 2 * rows * (config.intermediate_size * element + model.vocab_size * 4)
    return cache + activations
