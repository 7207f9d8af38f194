"""Measurements derived from raw facts: analytic FLOPs from evaluation counts, ROUGE against a
reference summary, and peak memory.

FLOPs are counted, not guessed: `count_flops` multiplies the work the adapter recorded
(`EvalCounts`) by per-architecture matmul costs read from the model config. The tests check it
against `torch.utils.flop_counter.FlopCounterMode` on real forward passes.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import torch

from lsbench.models import EvalCounts

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


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


# --- agreement with the baseline -----------------------------------------------------------

def first_mismatch(output: list[int], reference: list[int]) -> int:
    """First position where `output` differs from `reference`; -1 when they are identical.
    When one is a strict prefix of the other, the shorter length (the first missing token)."""
    for i, (a, b) in enumerate(zip(output, reference, strict=False)):
        if a != b:
            return i
    return -1 if len(output) == len(reference) else min(len(output), len(reference))


def agreement(output: list[int], reference: list[int]) -> float:
    """Share of positions, up to the shorter sequence, where both hold the same token (NaN
    when either is empty). Unlike a prefix match it keeps counting after a first difference,
    which is what a lossy strategy's quality needs."""
    n = min(len(output), len(reference))
    if n == 0:
        return math.nan
    return sum(a == b for a, b in zip(output, reference, strict=False)) / n


# --- ROUGE ------------------------------------------------------------------------------------

@functools.cache
def _rouge_scorer():
    # Imported lazily and built once: construction loads the Porter stemmer.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def rouge_scores(prediction: str, reference: str | None) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of `prediction` against `reference`; NaN without a reference,
    so that a missing reference is never averaged in as a score of zero."""
    if reference is None or not reference.strip():
        return dict.fromkeys(ROUGE_KEYS, math.nan)
    scores = _rouge_scorer().score(reference, prediction)  # score(target, prediction)
    return {key: float(scores[key].fmeasure) for key in ROUGE_KEYS}


# --- memory -------------------------------------------------------------------------------

def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window on CUDA. The CPU's peak RSS cannot be reset: it stays the
    process-lifetime maximum."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> tuple[int, int]:
    """(allocated, reserved) peak bytes: the CUDA caching allocator's peaks since the last
    reset; on CPU the process's peak resident set size and 0 (no allocator to reserve)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    import resource  # POSIX only; imported here so that the module loads everywhere

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return (maxrss if sys.platform == "darwin" else maxrss * 1024), 0
