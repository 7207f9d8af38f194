"""Decoding B prompts together (static batching): the contract the runner, the scan and the
benchmarks build on. Every row keeps its own accepted prefix, stops on its own stop token or
budget, and idles once finished until the batch ends.

PLACEHOLDER: the body below decodes the rows one after another with the batch-1 engine, so the
outputs are right but the timings are not a batch's. The batched engine replaces it."""

from __future__ import annotations

from dataclasses import dataclass

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.engine.generation import DecodingConfig, Generation, sync
from lsbench.engine.strategies import generate

# lsbench's own loops decode batches; transformers' assisted strategies are batch 1 only.
BATCHED_STRATEGIES = ("ar", "spec", "layerskip", "pld", "exit")


@dataclass(frozen=True)
class BatchGeneration:
    """What one batch did. Each row's `decode_s` runs until that row's last emission; the
    batch's `decode_s` until every row has finished (its slowest row)."""

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
    sync(model.device)
    rows = [generate(strategy, model, p, cfg, k=k, exit_layer=exit_layer, draft=draft,
                     compiled=compiled)
            for p in prompts]
    return BatchGeneration(rows, sum(r.prefill_s for r in rows), sum(r.decode_s for r in rows))
