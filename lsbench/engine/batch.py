"""Decoding B prompts together (static batching): the contract the runner, the scan and the
benchmarks build on. Every row keeps its own accepted prefix, stops on its own stop token or
budget, and idles once finished until the batch ends. The loops themselves are
`strategies.decode_ar` / `strategies.decode_speculative`: batch-1 `generate` is a batch of one."""

from __future__ import annotations

from dataclasses import dataclass

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.engine.generation import DecodingConfig, Generation
from lsbench.engine.strategies import decode, generate
from lsbench.errors import LsbenchError

# lsbench's own loops decode batches; transformers' assisted strategies are batch 1 only.
BATCHED_STRATEGIES = ("ar", "spec", "layerskip", "pld", "exit")


@dataclass(frozen=True)
class BatchGeneration:
    """What one batch did. Each row's `decode_s` runs until that row's last emission; the
    batch's `decode_s` until every row has finished (its slowest row). Each row's counts are
    the batch's (every forward over B rows x T tokens, finished rows included)."""

    rows: list[Generation]
    prefill_s: float  # the batch's prompts up to every row's first new token
    decode_s: float  # from the first new tokens until the last row finished

    @property
    def new_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rows)


def generate_batch(strategy: str, model: EarlyExitModel, prompts: list[list[int]],
                   cfg: DecodingConfig, *, k: int = 4, exit_layer: int | None = None,
                   draft: EarlyExitModel | None = None,
                   compiled: bool = False) -> BatchGeneration:
    """Decode `prompts` together with one strategy (see `BATCHED_STRATEGIES`)."""
    if strategy not in BATCHED_STRATEGIES:
        if len(prompts) == 1:  # a reference strategy at batch 1: its own harness
            row = generate(strategy, model, prompts[0], cfg, k=k, exit_layer=exit_layer,
                           draft=draft, compiled=compiled)
            return BatchGeneration([row], row.prefill_s, row.decode_s)
        raise LsbenchError(f"strategy '{strategy}' decodes batch 1 only; batched strategies: "
                           f"{', '.join(BATCHED_STRATEGIES)}")
    run = decode(strategy, model, prompts, cfg, k=k, exit_layer=exit_layer, draft=draft,
                 compiled=compiled)
    return BatchGeneration(run.rows, run.prefill_s, run.decode_s)
