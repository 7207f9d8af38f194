"""Measurements derived from raw facts: analytic FLOPs from evaluation counts, ROUGE against a
reference summary, losslessness verdicts, and memory.

FLOPs are counted, not guessed: `count_flops` multiplies the work the adapter recorded
(`EvalCounts`) by per-architecture matmul costs read from the model config. The tests check it
against `torch.utils.flop_counter.FlopCounterMode` on real forward passes.
"""

from __future__ import annotations

import functools
import math
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


# --- losslessness in low precision --------------------------------------------------------

# A flip between two tokens whose float32 logits differ by at most this many units in the
# last place of the measured dtype (at the logits' magnitude) is a near-tie: batched and
# one-token passes round differently and may pick either. bf16 has eps = 2^-7, so at a logit
# of 10 the threshold is 16 * 0.0078 * 10 = 1.25; float32's is 1.9e-5 there.
NEAR_TIE_ULPS = 16
VERDICTS = ("exact", "near-tie", "MISMATCH")


@torch.inference_mode()
def teacher_forced_logits(model: torch.nn.Module, prompt_ids: list[int], output_ids: list[int],
                          position: int) -> torch.Tensor:
    """float32 logits for output position `position` (0 = first new token), from one forward
    of `model` over prompt + output; `position` may be len(output_ids) (the next token)."""
    ids = [*prompt_ids, *output_ids[:position]]
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits
    return logits[0, -1].float()


def logit_gap(logits: torch.Tensor, baseline_token: int | None, token: int | None
              ) -> tuple[float, float]:
    """(margin, scale) at a first mismatch: the gap between the logits of the baseline's token
    and the row's token there, which is the top-1 minus top-2 margin when the flip is between
    the two leading tokens; top-1 minus top-2 when one output has ended. `scale` is the larger
    magnitude of the two logits, for the dtype's resolution at that size."""
    vocab = logits.shape[-1]
    if baseline_token is None or token is None or not (0 <= baseline_token < vocab
                                                       and 0 <= token < vocab):
        top = torch.topk(logits, 2).values
        return float(top[0] - top[1]), float(top.abs().max())
    a, b = float(logits[baseline_token]), float(logits[token])
    return abs(a - b), max(abs(a), abs(b))


def near_tie_threshold(dtype: torch.dtype, scale: float) -> float:
    """NEAR_TIE_ULPS units in the last place of `dtype` at magnitude `scale` (at least 1)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return NEAR_TIE_ULPS * eps * max(abs(scale), 1.0)


def lossless_verdict(margin: float, scale: float, dtype: torch.dtype) -> str:
    """'near-tie' when the first mismatch flips tokens closer than the dtype can resolve,
    'MISMATCH' otherwise ('exact' rows never get here)."""
    return "near-tie" if margin <= near_tie_threshold(dtype, scale) else "MISMATCH"


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
