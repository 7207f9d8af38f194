"""What every decoding loop shares: the decoding settings, the record of one generation, and
the device synchronisation around timers. lsbench's own loops (`strategies`) and transformers'
reference harness (`hf_reference`) both build on it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lsbench.backend.early_exit import EarlyExitModel, EvalCounts
from lsbench.errors import LsbenchError


@dataclass(frozen=True)
class DecodingConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Generation:
    """What one generation did, as measured. Rounds are verification rounds."""

    tokens: list[int]
    prefill_s: float  # prompt processing up to the first new token
    decode_s: float  # everything after the first new token
    decode_tokens: int  # tokens emitted after the first one
    drafted: list[int] = field(default_factory=list)  # per round
    accepted: list[int] = field(default_factory=list)  # per round
    prefill_counts: EvalCounts | None = None
    decode_counts: EvalCounts | None = None
    draft_prefill_counts: EvalCounts | None = None
    draft_decode_counts: EvalCounts | None = None
    kv_cache_bytes: int = 0  # bytes the committed tokens' keys and values occupy at the end
    kv_cache_capacity_bytes: int = 0  # bytes of the KV-cache storage allocated at the peak
    draft_s: float = 0.0  # seconds spent proposing drafts (lsbench's speculative loops)
    # Raw timing of each decode step after the first token (a round of a speculative loop, a
    # token of ar): when it ended, in seconds since the first token, and how many tokens it
    # emitted. Latency percentiles (TPOT, inter-token latency) are derived from these.
    step_end_s: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    # The speculative engine's policy as run (`lsbench.engine.policy`), for the scan's replay:
    eager_head: bool = False  # verify head over all rows at once (else lazy: row 0 first)
    defer_threshold: float | None = None  # measured deferral break-even; None: the E/L rule
    device_loop: bool = False  # greedy rounds with one device-to-host transfer (CUDA)
    compiled: bool = False  # ran the compiled forwards (else eager)


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels so that a timer reads finished work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def prompt_tensor(model: EarlyExitModel, prompt_ids: list[int]) -> torch.Tensor:
    if not prompt_ids:
        raise LsbenchError("empty prompt")
    return torch.tensor([prompt_ids], device=model.device)
