"""Latency of one generation as a serving engineer reads it: time to first token (TTFT), time
per output token (TPOT) and inter-token latency (ITL) percentiles, derived from the raw
per-step record (`Generation.step_end_s`, `Generation.step_tokens`).

The ITL convention: each emitted token's latency is the time since the previous emission (what
a streaming client sees). A step that emits n tokens contributes one gap (since the previous
step ended; the first step's gap is measured from the first token) followed by n - 1 zeros,
so a speculative round of 4 gives [g, 0, 0, 0]. The gaps sum to the last step's end time.
Percentiles are numpy's default (linear interpolation between order statistics)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ITL_PERCENTILES = (50, 90, 99)


def token_gaps(step_end_s: Sequence[float], step_tokens: Sequence[int]) -> list[float]:
    """One latency per token emitted after the first: the time since the previous emission."""
    if len(step_end_s) != len(step_tokens):
        raise ValueError(f"{len(step_end_s)} step times for {len(step_tokens)} step counts")
    gaps: list[float] = []
    previous = 0.0  # the first token's time: step_end_s counts from it
    for end, n in zip(step_end_s, step_tokens, strict=True):
        if n > 0:  # a step that emitted nothing is folded into the next emission's gap
            gaps += [end - previous] + [0.0] * (n - 1)
            previous = end
    return gaps


def itl_percentiles(gaps: Sequence[float],
                    percentiles: Sequence[float] = ITL_PERCENTILES) -> dict[str, float]:
    """`itl_p<q>_s` for each q; NaN when there are no gaps (a single-token generation)."""
    values = np.percentile(gaps, percentiles) if len(gaps) else [math.nan] * len(percentiles)
    return {f"itl_p{q:g}_s": float(v) for q, v in zip(percentiles, values, strict=True)}


def latency_columns(prefill_s: float, decode_s: float, decode_tokens: int,
                    step_end_s: Sequence[float], step_tokens: Sequence[int]) -> dict:
    """TTFT, TPOT and ITL percentiles of one generation, plus the raw steps they came from."""
    return {
        "ttft_s": prefill_s,
        "tpot_s": decode_s / decode_tokens if decode_tokens else math.nan,
        **itl_percentiles(token_gaps(step_end_s, step_tokens)),
        "step_end_s": list(step_end_s), "step_tokens": list(step_tokens),
    }
