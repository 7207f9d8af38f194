"""The cost model shared by `make bench-engine` and `lsbench scan`: unit costs measured in the
running process, and the seconds of each decoding round priced exactly as lsbench's engine
schedules its work (the deferred last draft, the lazy verify head).

`UnitCosts` is bench-engine's summary at one k. `CostTable` is the scan's: a decoder layer at
1..K+1 tokens, the fixed cost of one `run_layers` call, the head at 1..K+1 rows, measured
against a cache that holds a realistic context, plus two loop overheads fitted to measured
generations (per token fed, per verification round).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.backend.kv_cache import crop_cache
from lsbench.engine.generation import sync
from lsbench.engine.policy import EnginePolicy
from lsbench.scenario.replay import Replay, Round


@dataclass(frozen=True)
class UnitCosts:
    """Seconds of one decoder layer at 1, k and k+1 tokens, and of the LM head at 1 and k+1
    rows. The rounds below are rounds that accept nothing, the regime of the embedded model."""

    layer_1: float
    layer_k: float
    layer_k1: float
    head_1: float
    head_k1: float

    def _drafts(self, e: int, k: int) -> float:
        return k * (e * self.layer_1 + self.head_1)

    def layerskip_round(self, num_layers: int, e: int, k: int, *, defer: bool = True) -> float:
        """lsbench: k drafts through layers [0, E) + head, then the deep layers over the k
        cached exit states and one head row. Not deferred (DESIGN's round as written), the
        last draft's shallow pass runs too and the deep layers take k+1 tokens."""
        if e == num_layers:  # the drafts' exit logits are the target's
            return self._drafts(e, k) + (0.0 if defer else e * self.layer_1 + self.head_1)
        deep, shallow = (self.layer_k, 0.0) if defer else (self.layer_k1, e * self.layer_1)
        return self._drafts(e, k) + shallow + (num_layers - e) * deep + self.head_1

    def hf_early_exit_round(self, num_layers: int, e: int, k: int) -> float:
        """transformers: the same drafts, then all layers and the head over k+1 tokens."""
        return self._drafts(e, k) + num_layers * self.layer_k1 + self.head_k1


@torch.inference_mode()
def measure_unit_costs(model: EarlyExitModel, prompt: list[int], k: int,
                       repeats: int = 15) -> UnitCosts:
    """Median times of a pass through all layers (per layer) and of the head, at 1, k and k+1
    tokens, against a cache holding the prompt: the weights stream as they do in decoding."""
    cache = model.new_cache()
    model.run_layers(model.embed(torch.tensor([prompt], device=model.device)), cache, 0,
                     model.num_layers)

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            sync(model.device)
            t0 = time.perf_counter()
            fn()
            sync(model.device)
            times.append(time.perf_counter() - t0)
            crop_cache(cache, len(prompt))
        return statistics.median(times)

    def layers(n: int) -> float:
        ids = torch.tensor([prompt[-n:]], device=model.device)
        hidden = model.embed(ids)
        n_layers = model.num_layers
        return timed(lambda: model.run_layers(hidden, cache, 0, n_layers)) / n_layers

    def head(n: int) -> float:
        hidden = torch.randn(1, n, model.config.hidden_size, device=model.device,
                             dtype=model.dtype)
        return timed(lambda: model.logits(hidden))

    return UnitCosts(layers(1), layers(k), layers(k + 1), head(1), head(k + 1))


def policy_from_unit_costs(k: int, unit: UnitCosts) -> EnginePolicy:
    return EnginePolicy(k, unit.layer_1, unit.layer_k, unit.layer_k1, unit.head_1, unit.head_k1)


def calibrate(model: EarlyExitModel, k: int, prompt: list[int],
              measure: Callable[[EarlyExitModel, list[int], int], UnitCosts] | None = None,
              ) -> EnginePolicy:
    """Measure the engine's unit costs once per model (and so device) and k, and keep the
    resulting policy on the model, where `generate_speculative` finds it. Call it during
    warm-up, never inside a timed generation. `prompt`: any tokens of the model's vocabulary
    (repeated up to k+1); `measure` is replaceable for tests."""
    if k in model.engine_policies:
        return model.engine_policies[k]
    ids = (list(prompt) * (k + 1))[: max(len(prompt), k + 1)]
    counts = model.counts.copy()
    unit = (measure or (lambda m, p, n: measure_unit_costs(m, p, n, repeats=5)))(model, ids, k)
    model.counts = counts  # measuring is not decoding work
    policy = policy_from_unit_costs(k, unit)
    model.engine_policies[k] = policy
    return policy


def no_bonus(r: Round) -> bool:
    """Every draft accepted and the last one a stop token (drafting stops at one, so it can
    only be last): the round emits the drafts alone and the output ends there, so the engine
    never computes the bonus token (`strategies.accept` returns None for it)."""
    return r.drafted > 0 and r.accepted == r.drafted and r.emitted == r.accepted


@dataclass(frozen=True)
class CostTable:
    """Seconds of the engine's units. layer[n-1]: one decoder layer over n tokens inside a
    multi-layer call; call: the fixed part of one `run_layers` call (masks, rotary);
    head[n-1]: final norm + LM head over n rows; step: loop work per token fed (embedding,
    argmax, small tensors); round: loop work per verification round (accept, cache crop).
    draft_forward[n-1]: a draft model's whole forward over n tokens (n = 1, 2); draft_head.
    eager_head: the engine's verify head computes every row at once (`policy.EnginePolicy`,
    `Generation.eager_head`) instead of row 0 first and the rest after an accepted draft."""

    num_layers: int
    layer: tuple[float, ...]
    call: float
    head: tuple[float, ...]
    step: float = 0.0
    round: float = 0.0
    draft_forward: tuple[float, ...] = ()
    draft_head: float = 0.0
    eager_head: bool = False

    def verify_head(self, rows: int, accepted: int) -> float:
        """The verify head over `rows` rows (row 0 first when lazy)."""
        if rows <= 0:
            return 0.0
        if self.eager_head:
            return self.head[rows - 1]
        return self.head[0] + (self.head[rows - 2] if accepted >= 1 and rows >= 2 else 0.0)

    def verify_head_with_bonus(self, r: Round) -> float:
        """The verify head over the pending token and all r.drafted drafts (n + 1 rows, the
        last the bonus row). Lazy: rows 1..n are one call once the first draft is accepted;
        when that draft was the only one and a stop token, `strategies.accept` ends the
        output without reading row 1, so it is never computed."""
        if r.drafted == 1 and no_bonus(r) and not self.eager_head:
            return self.head[0]
        return self.verify_head(r.drafted + 1, r.accepted)

    @property
    def max_tokens(self) -> int:
        return min(len(self.layer), len(self.head))

    def layers(self, span: int, n: int) -> float:
        """One `run_layers` call over `span` layers and n tokens."""
        return 0.0 if span <= 0 else self.call + span * self.layer[n - 1]

    def ar_step(self) -> float:
        return self.layers(self.num_layers, 1) + self.head[0] + self.step

    def layerskip_round(self, r: Round, e: int) -> float:
        """One self-speculative round of `strategies.SelfSpeculator`, as scheduled."""
        L, n, a = self.num_layers, r.drafted, r.accepted
        shallow = self.layers(e, 1) + self.head[0] + self.step  # one draft step
        t = (n + r.conf_stopped) * shallow + self.round
        last_pass = self.layers(e, 1) + self.layers(L - e, 1) + self.head[0] + self.step
        bonus_pass = last_pass if a == n and not no_bonus(r) else 0.0
        if e == L:  # drafts' logits are the full model's; the bonus needs one more full pass
            return t + bonus_pass
        if n == 0 and not r.conf_stopped:  # nothing drafted: an autoregressive step
            return t + last_pass
        if r.conf_stopped:  # every fed token's exit state is cached: deep layers over n + 1
            return t + self.layers(L - e, n + 1) + self.verify_head(n + 1, a)
        if not r.deferred:  # last draft's shallow pass, deep layers over n + 1
            return (t + self.layers(e, 1) + self.step + self.layers(L - e, n + 1)
                    + self.verify_head_with_bonus(r))
        t += self.layers(L - e, n) + self.verify_head(n, a)  # deferred: over the n cached
        return t + bonus_pass

    def spec_round(self, r: Round) -> float:
        """One round of `strategies.DraftModelSpeculator`: own-cache drafts, full verify
        (its head as in `verify_head_with_bonus`)."""
        n = r.drafted
        t = self.round
        for i in range(n):
            fed = r.first_fed if i == 0 else 1
            t += self.draft_forward[min(fed, len(self.draft_forward)) - 1] + self.draft_head
            t += self.step
        return t + self.layers(self.num_layers, n + 1) + self.verify_head_with_bonus(r) + self.step

    def pld_round(self, r: Round) -> float:
        """One round of `strategies.PromptLookupSpeculator`: the drafts are a lookup (no model
        work; its time is in the round overhead), then every layer over the pending token and
        the drafts, and the verify head (lazy: row 0, the other rows only if the first draft is
        accepted, unless that draft was the only one and ended the output: no bonus row)."""
        return (self.round + self.layers(self.num_layers, r.drafted + 1) + self.step
                + self.verify_head_with_bonus(r))

    def round_seconds(self, r: Round, strategy: str, exit_layer: int = 0) -> float:
        if strategy == "pld":
            return self.pld_round(r)
        if strategy == "spec":
            return self.spec_round(r)
        return self.layerskip_round(r, exit_layer)

    def decode_seconds(self, rep: Replay, strategy: str, exit_layer: int = 0) -> float:
        return sum(self.round_seconds(r, strategy, exit_layer) for r in rep.rounds)

    def batch_decode_seconds(self, reps: list[Replay], strategy: str,
                             exit_layer: int = 0) -> list[float]:
        """Per row of a static batch priced with this table's units measured over the
        batch's rows: each row's rounds are its batch-1 rounds (greedy, per-row lengths), the
        rows run round i together, and a batched round costs what its costliest active row's
        round costs (every unit call is as wide as its widest row). A row's seconds end with
        its last round; the batch's are its slowest row's. `strategy` "ar": one step a token."""
        if strategy == "ar":
            return [r.decode_tokens * self.ar_step() for r in reps]
        longest = max((len(r.rounds) for r in reps), default=0)
        ends, t = [], 0.0
        for i in range(longest):
            t += max(self.round_seconds(r.rounds[i], strategy, exit_layer)
                     for r in reps if i < len(r.rounds))
            ends.append(t)
        return [ends[len(r.rounds) - 1] if r.rounds else 0.0 for r in reps]

    def with_overheads(self, *, step: float | None = None,
                       round: float | None = None) -> CostTable:
        return dataclasses.replace(self, step=self.step if step is None else step,
                                   round=self.round if round is None else round)


def _timer(device: torch.device, repeats: int):
    def timed(fn, reset) -> float:
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
            reset()
        return statistics.median(times)
    return timed


@torch.inference_mode()
def measure_cost_table(model: EarlyExitModel, context: list[int], max_tokens: int,
                       draft: EarlyExitModel | None = None, repeats: int = 7,
                       batch: int = 1) -> CostTable:
    """Median unit times against caches holding `context` (use prompt + part of the output,
    the context decoding actually sees), for calls of 1..max_tokens tokens; with `batch` B,
    of calls over B rows of that context (a batch's forward over B rows x n tokens)."""
    timed = _timer(model.device, repeats)
    L = model.num_layers
    cache = model.new_cache(batch)
    ids = torch.tensor([context] * batch, device=model.device)
    model.run_layers(model.embed(ids), cache, 0, L)
    counts = model.counts.copy()

    def reset() -> None:
        crop_cache(cache, len(context))

    def full(n: int) -> float:
        hidden = model.embed(ids[:, -n:])
        return timed(lambda: model.run_layers(hidden, cache, 0, L), reset)

    one_layer = timed(lambda: model.run_layers(model.embed(ids[:, -1:]), cache, 0, 1), reset)
    totals = [full(n) for n in range(1, max_tokens + 1)]
    per_layer_1 = (totals[0] - one_layer) / (L - 1) if L > 1 else totals[0]
    call = max(one_layer - per_layer_1, 0.0)
    layer = tuple(max(t - call, 0.0) / L for t in totals)

    def head(n: int) -> float:
        hidden = torch.randn(batch, n, model.config.hidden_size, device=model.device,
                             dtype=model.dtype)
        return timed(lambda: model.logits(hidden), lambda: None)

    heads = tuple(head(n) for n in range(1, max_tokens + 1))
    model.counts = counts  # measuring is not decoding work
    table = CostTable(L, layer, call, heads)
    return table if draft is None else with_draft_costs(table, draft, context, repeats)


@torch.inference_mode()
def with_draft_costs(table: CostTable, draft: EarlyExitModel, context: list[int],
                     repeats: int = 7) -> CostTable:
    """`table` with a draft model's forward at 1 and 2 tokens and its head at 1 row."""
    ids = torch.tensor([context], device=draft.device)
    counts = draft.counts.copy()
    d_cache = draft.new_cache()
    d_ids = ids.to(draft.device)
    draft.run_layers(draft.embed(d_ids), d_cache, 0, draft.num_layers)
    d_timed = _timer(draft.device, repeats)

    def d_reset() -> None:
        crop_cache(d_cache, len(context))

    def d_full(n: int) -> float:
        hidden = draft.embed(d_ids[:, -n:])
        return d_timed(lambda: draft.run_layers(hidden, d_cache, 0, draft.num_layers), d_reset)

    d_hidden = torch.randn(1, 1, draft.config.hidden_size, device=draft.device,
                           dtype=draft.dtype)
    table = dataclasses.replace(table, draft_forward=(d_full(1), d_full(2)),
                                draft_head=d_timed(lambda: draft.logits(d_hidden),
                                                   lambda: None))
    draft.counts = counts
    return table
