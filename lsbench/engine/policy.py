"""The speculative engine's two cost-driven choices, torch-free so that the scan's replay
(`replay`) and the engine (`strategies`) share one definition:

- the verify head's shape: lazy (row 0 alone, the other rows only after an accepted first
  draft) where a (k+1)-row LM head costs about k+1 rows, as on a CPU; eager (all k+1 rows in
  one call) where it costs about one row, as on a GPU;
- when `layerskip` defers its last draft (see `defer_last_draft`).

Without a calibration (`costs.calibrate`), the engine uses the lazy head and the E/L rule,
lsbench's behaviour before calibration existed, which the tests and the scan replay assume.
"""

from __future__ import annotations

from dataclasses import dataclass

EAGER_HEAD_RATIO = 1.5  # eager when head(k+1 rows) <= 1.5 x head(1 row)


@dataclass(frozen=True)
class EnginePolicy:
    """What the engine does, from unit costs measured once per model, device and k (seconds):
    a decoder layer at 1, k and k+1 tokens, the LM head at 1 and k+1 rows."""

    k: int
    layer_1: float
    layer_k: float
    layer_k1: float
    head_1: float
    head_k1: float

    @property
    def eager_head(self) -> bool:
        return self.head_k1 <= EAGER_HEAD_RATIO * self.head_1

    def defer_threshold(self, exit_layer: int, num_layers: int) -> float:
        """Break-even share of fully accepted rounds. Verifying the last draft with the others
        costs, every round, its shallow pass (E one-token layers) plus one more token in each
        deep layer; deferring it costs, in a fully accepted round only, a one-token pass
        through all L layers and one head row. Defer while the share is below their ratio."""
        eager = (exit_layer * self.layer_1
                 + (num_layers - exit_layer) * max(self.layer_k1 - self.layer_k, 0.0))
        deferred = num_layers * self.layer_1 + self.head_1
        return eager / deferred if deferred > 0 else 0.0

    def describe(self, exit_layer: int | None = None, num_layers: int | None = None) -> str:
        head = "eager" if self.eager_head else "lazy"
        text = (f"{head} verify head (head {self.head_k1 / max(self.head_1, 1e-12):.2f}x at "
                f"{self.k + 1} rows)")
        if exit_layer is not None and num_layers is not None:
            text += (f", defer below {self.defer_threshold(exit_layer, num_layers):.3f} full "
                     f"rounds (E/L {exit_layer / num_layers:.3f})")
        return text


def defer_last_draft(full_rounds: int, rounds: int, exit_layer: int, num_layers: int,
                     threshold: float | None = None) -> bool:
    """Whether to leave the last draft out of verification until every draft is accepted.

    The last draft's own pass only yields the bonus token of a fully accepted round. Running
    it with the others costs E sequential one-token layer calls every round; deferring it
    costs L of them in a fully accepted round only. Defer while the (Laplace-smoothed) share
    of fully accepted rounds so far is below E / L, or below a measured `threshold`
    (`EnginePolicy.defer_threshold`)."""
    if threshold is None:
        return (full_rounds + 1) / (rounds + 2) * num_layers < exit_layer
    return (full_rounds + 1) / (rounds + 2) < threshold
