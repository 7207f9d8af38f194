"""Quality: ROUGE against a reference summary, agreement with the baseline's tokens, and
the losslessness verdicts (exact, near-tie, MISMATCH) with their float32 margins."""

from __future__ import annotations

import copy
import functools
import math

import torch

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def quality_columns(text: str, reference: str | None, tokens: list[int],
                    baseline_ids: list[int] | None) -> dict:
    """ROUGE of the decoded text against the reference summary, and agreement with the
    baseline's tokens (None/NaN where the row has no baseline)."""
    compared = baseline_ids is not None
    return {**rouge_scores(text, reference),
            "matches_baseline": tokens == baseline_ids if compared else None,
            "agreement": agreement(tokens, baseline_ids) if compared else math.nan}


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


@torch.no_grad()
def float32_copy_on_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of `model` in host memory, made one tensor at a time: the model's own
    device never holds a second copy (a 7B model in fp32 is 28 GB). Tied weights stay tied
    (deepcopy's memo maps each shared tensor once) and `model` is left untouched."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        if id(p) not in memo:  # move first, convert on the host: no fp32 tensor on the device
            memo[id(p)] = torch.nn.Parameter(p.detach().to("cpu").float(), p.requires_grad)
    for b in model.buffers():
        if id(b) not in memo:
            host = b.detach().to("cpu")
            memo[id(b)] = host.float() if host.is_floating_point() else host
    reference = copy.deepcopy(model, memo)
    try:  # a model dispatched with a device_map: its copy must not move inputs back there
        from accelerate.hooks import remove_hook_from_module
    except ImportError:
        pass
    else:
        remove_hook_from_module(reference, recurse=True)
    return reference.to(torch.float32)


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
