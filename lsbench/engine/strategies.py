"""lsbench's decoding loops, batched: B prompts decode together (B = 1 is the batch-1 engine;
there is one path). Read top to bottom: sampling, the rows of a static batch, prefill, the
autoregressive loop (and the lossy early exit, the same loop through fewer layers), the
speculative loop with its three drafters (a separate draft model; the model's own early exit
sharing one KV cache; prompt lookup, which costs no model work), then `generate`, which runs
a strategy by name (transformers' `generate()` references live in `hf_reference`).

Rows are left-padded into one static KV cache with per-row lengths (`backend.kv_cache`): every
row keeps its own accepted prefix each round, stops on its own stop token or budget, and idles
once finished until the batch ends. Under greedy decoding each row's rounds are its batch-1
rounds. Every strategy returns `Generation`s: raw facts only (tokens, seconds, per-round
counts, layer-token evaluations). Derived metrics are computed elsewhere from these.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lsbench.backend.early_exit import (
    EarlyExitModel,
    EvalCounts,
    check_draft_vocabulary,
    check_exit_layers,
)
from lsbench.backend.kv_cache import StaticKVCache, cache_capacity_bytes, capacity_for
from lsbench.engine.generation import DecodingConfig, Generation, sync
from lsbench.engine.hf_reference import HF_STRATEGIES, generate_hf
from lsbench.engine.policy import EnginePolicy, defer_last_draft
from lsbench.engine.prompt_lookup import MAX_NGRAM, lookup_drafts
from lsbench.errors import LsbenchError

STRATEGIES = ("ar", "spec", "layerskip", "pld", "exit", *HF_STRATEGIES)
LOSSY = ("exit",)  # strategies whose output may differ from the full model's by design


# --- sampling -------------------------------------------------------------------------------

class Sampler:
    """Greedy argmax or temperature/top-k/top-p sampling from a seeded generator (one per
    row: row b of a batch draws from seed + b)."""

    def __init__(self, cfg: DecodingConfig, device: torch.device, row: int = 0):
        self.cfg = cfg
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed + row)

    @property
    def greedy(self) -> bool:
        return not self.cfg.do_sample

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution actually sampled from (warped); 1-D over the vocabulary."""
        logits = logits / max(self.cfg.temperature, 1e-5)
        if self.cfg.top_k > 0:
            kth = torch.topk(logits, min(self.cfg.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.cfg.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= self.cfg.top_p  # keep the first over top_p
            logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        return logits.softmax(-1)

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, device=self.generator.device))

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Next token and, when sampling, the distribution it was drawn from."""
        if self.greedy:
            return int(logits.argmax()), None
        probs = self.probs(logits)
        return self.draw(probs), probs


def pick(samplers: list[Sampler], logits: torch.Tensor) -> tuple[torch.Tensor, list | None]:
    """Every row's next token from [B, V] logits, as a [B] device tensor (greedy: no host
    transfer) and, when sampling, each row's distribution."""
    if samplers[0].greedy:
        return logits.argmax(-1), None
    picked = [s.pick(row) for s, row in zip(samplers, logits, strict=True)]
    return torch.tensor([t for t, _ in picked], device=logits.device), [q for _, q in picked]


# --- the rows of a static batch ---------------------------------------------------------------

class Rows:
    """Per-row host state: committed tokens (prompt + output), output, rounds, step times.
    `capacity`: the KV-cache slots the job needs (`kv_cache.capacity_for`)."""

    def __init__(self, prompts: list[list[int]], cfg: DecodingConfig, k: int = 0):
        if not prompts or any(not p for p in prompts):
            raise LsbenchError("empty prompt")
        longest = max(map(len, prompts))
        self.cfg, self.stop = cfg, frozenset(cfg.stop_token_ids)
        self.pads = [longest - len(p) for p in prompts]
        self.prompts = [list(p) for p in prompts]
        self.committed = [list(p) for p in prompts]
        self.out: list[list[int]] = [[] for _ in prompts]
        self.drafted: list[list[int]] = [[] for _ in prompts]
        self.accepted: list[list[int]] = [[] for _ in prompts]
        self.step_end_s: list[list[float]] = [[] for _ in prompts]
        self.step_tokens: list[list[int]] = [[] for _ in prompts]
        self.capacity = capacity_for(longest, cfg.max_new_tokens, k)

    def __len__(self) -> int:
        return len(self.prompts)

    def padded(self, device: torch.device) -> torch.Tensor:
        """The prompts left-padded into one [B, P] input (padding is masked out)."""
        return torch.tensor([[p[0]] * pad + p for p, pad in zip(self.prompts, self.pads,
                                                                strict=True)], device=device)

    def active(self, b: int) -> bool:
        out = self.out[b]
        return len(out) < self.cfg.max_new_tokens and not (out and out[-1] in self.stop)

    def running(self) -> list[int]:
        return [b for b in range(len(self)) if self.active(b)]

    def budget(self, b: int, k: int) -> int:
        """Drafts row b may propose this round: never past max_new_tokens; 0 once finished."""
        return min(k, self.cfg.max_new_tokens - len(self.out[b]) - 1) if self.active(b) else 0

    def pending(self, device: torch.device) -> torch.Tensor:
        """Every row's last committed token, the next forward's input: [B, 1]."""
        return torch.tensor([[c[-1]] for c in self.committed], device=device)

    def emit(self, b: int, tokens: list[int], now: float | None) -> None:
        """Row b commits `tokens`; `now` (seconds since the first token) ends a decode step."""
        self.out[b] += tokens
        self.committed[b] += tokens
        if now is not None:
            self.step_end_s[b].append(now)
            self.step_tokens[b].append(len(tokens))

    def cached(self) -> list[int]:
        """The cache invariant between steps: every committed token but the pending last."""
        return [len(c) - 1 for c in self.committed]

    def generations(self, prefill_s: float, counts: tuple, caches: Sequence[StaticKVCache],
                    **policy) -> list[Generation]:
        """One `Generation` per row. Counts are the batch's (a forward over B rows x T
        tokens); the KV-cache bytes are the row's own, its capacity its share of the storage."""
        capacity = cache_capacity_bytes(*caches) // len(self)
        return [Generation(
            self.out[b], prefill_s, self.step_end_s[b][-1] if self.step_end_s[b] else 0.0,
            len(self.out[b]) - 1, self.drafted[b], self.accepted[b],
            prefill_counts=counts[0], decode_counts=counts[1],
            draft_prefill_counts=counts[2], draft_decode_counts=counts[3],
            step_end_s=self.step_end_s[b], step_tokens=self.step_tokens[b],
            kv_cache_bytes=sum(c.committed_bytes(b) for c in caches),
            kv_cache_capacity_bytes=capacity, **policy) for b in range(len(self))]


@dataclass(frozen=True)
class BatchRun:
    """What a batch did: its rows and its wall times (decode: until the slowest row ends)."""

    rows: list[Generation]
    prefill_s: float
    decode_s: float


class Clock:
    """Wall time of the phases, and the counts each phase added (main model, drafter)."""

    def __init__(self, model: EarlyExitModel, drafter: EarlyExitModel | None = None):
        self.model, self.drafter = model, drafter
        self.marks: list[tuple[float, EvalCounts, EvalCounts | None]] = []

    def mark(self) -> float:
        sync(self.model.device)
        now = time.perf_counter()
        self.marks.append((now, self.model.counts.copy(),
                           self.drafter.counts.copy() if self.drafter else None))
        return now

    def counts(self) -> tuple:
        """(prefill, decode, draft prefill, draft decode) counts between the three marks."""
        (_, c0, d0), (_, c1, d1), (_, c2, d2) = self.marks
        return (c1.minus(c0), c2.minus(c1), d1.minus(d0) if d0 else None,
                d2.minus(d1) if d1 else None)

    def seconds(self) -> tuple[float, float]:
        (t0, *_), (t1, *_), (t2, *_) = self.marks
        return t1 - t0, t2 - t1


# --- prefill and autoregressive decoding ----------------------------------------------------

def prefill(model: EarlyExitModel, rows: Rows, cache: StaticKVCache,
            depth: int | None = None) -> torch.Tensor:
    """Layers [0, depth) (all by default) over the padded prompts; [B, V] logits of their last
    positions only."""
    hidden = model.run_layers(model.embed(rows.padded(model.device)), cache, 0,
                              model.num_layers if depth is None else depth)
    return model.logits(hidden[:, -1:])[:, -1]


def start(model: EarlyExitModel, rows: Rows, cache: StaticKVCache, samplers: list[Sampler],
          depth: int | None = None) -> None:
    """Prefill and every row's first token (one transfer)."""
    tokens, _ = pick(samplers, prefill(model, rows, cache, depth))
    for b, token in enumerate(tokens.tolist()):
        rows.emit(b, [token], None)


@torch.inference_mode()
def decode_ar(model: EarlyExitModel, prompts: list[list[int]], cfg: DecodingConfig, *,
              depth: int | None = None, compiled: bool = False) -> BatchRun:
    """Autoregressive decoding through layers [0, depth) + final norm + LM head; all layers by
    default, the lossy early exit otherwise. One host transfer per step (the new tokens);
    finished rows keep feeding their last token and are rolled back after the step."""
    depth = model.num_layers if depth is None else depth
    rows = Rows(prompts, cfg)
    samplers = [Sampler(cfg, model.device, b) for b in range(len(rows))]
    cache = model.new_cache(len(rows), rows.capacity, rows.pads, max_step=compiled and 1)
    clock = Clock(model)
    clock.mark()
    start(model, rows, cache, samplers, depth)
    t1 = clock.mark()
    while active := rows.running():
        hidden = model.run_layers(model.embed(rows.pending(model.device)), cache, 0, depth)
        tokens, _ = pick(samplers, model.logits(hidden)[:, -1])
        host = tokens.tolist()  # a host transfer: the step's work is done
        now = time.perf_counter() - t1
        for b in active:
            rows.emit(b, [host[b]], now)
        cache.set_lengths(rows.cached())  # a no-op while every row is running
    clock.mark()
    prefill_s, decode_s = clock.seconds()
    return BatchRun(rows.generations(prefill_s, clock.counts(), [cache], compiled=compiled),
                    prefill_s, decode_s)


def generate_ar(model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig, *,
                depth: int | None = None) -> Generation:
    """Batch-1 `decode_ar`."""
    return decode_ar(model, [prompt_ids], cfg, depth=depth).rows[0]


def generate_exit(model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig,
                  exit_layer: int) -> Generation:
    """Early exit without verification (lossy): layers [0, E) + final norm + LM head for every
    token. The prompt is prefilled through [0, E) only: the deep layers never run, which is
    what exiting early means (and what the LayerSkip repository's exit-layer decoding does)."""
    check_exit_layers([exit_layer], model.num_layers)
    return generate_ar(model, prompt_ids, cfg, depth=exit_layer)


# --- speculative decoding: one propose/verify loop, three drafters --------------------------

@dataclass(frozen=True)
class Drafts:
    """One round's proposals: [B, n] on the device (the verify input) and, where the drafter
    already has them on the host, each row's list and (sampling) each draft's distribution.
    Rows are cut to their own budget and first stop token at acceptance (`cut`)."""

    tensor: torch.Tensor
    host: list[list[int]] | None = None
    probs: list[list] | None = None

    @property
    def width(self) -> int:
        return self.tensor.shape[1]


def cut(drafts: list[int], budget: int, stop: frozenset[int]) -> list[int]:
    """A row's drafts within its budget and through its first stop token: a batch drafts for
    its longest budget, and the device loop drafts past stop tokens."""
    drafts = drafts[:budget]
    for i, token in enumerate(drafts):
        if token in stop:
            return drafts[:i + 1]
    return drafts


def draft_steps(step: Callable[[torch.Tensor, int], torch.Tensor], first: torch.Tensor,
                budgets: list[int], samplers: list[Sampler], stop: frozenset[int],
                on_host: bool) -> Drafts:
    """Up to max(budgets) drafting steps; `step(ids, j)` gives [B, V] logits and each pick is
    fed back as the next input. On the host (a CPU, or sampling) the picks are read every
    step and drafting ends once every row is past its budget or drafted a stop token; on the
    device it runs the whole budget without a sync."""
    ids, tokens, probs = first, [], []
    host: list[list[int]] = [[] for _ in budgets]
    for j in range(max(budgets)):
        picked, q = pick(samplers, step(ids, j))
        tokens.append(picked)
        probs.append(q)
        ids = picked.view(-1, 1)
        if on_host:
            for b, token in enumerate(picked.tolist()):
                host[b].append(token)
            if all(j + 1 >= n or stop & set(h[:n]) for h, n in zip(host, budgets, strict=True)):
                break
    tensor = (torch.stack(tokens, dim=1) if tokens
              else torch.empty(len(budgets), 0, dtype=torch.long, device=first.device))
    per_row = None
    if tokens and probs[0] is not None:  # sampling: each row's q per draft
        per_row = [[q[b] for q in probs] for b in range(len(budgets))]
    return Drafts(tensor, host if on_host else None, per_row)


class VerifyLogits:
    """The full model's [B, V] logits at each verified position, computed on demand. Lazy (the
    default): position 0 alone, the rest in one call only if a first draft is accepted; with
    low acceptance most rounds pay for one LM-head row instead of k+1 (on a CPU a k+1-row
    head costs about k+1 times one row). Eager: every position in one call, where the
    measured head costs about the same at k+1 rows as at one (`policy.EnginePolicy`).
    Positions past `final_hidden` (or `known`) come from `last`, which the self-speculator
    uses to run the last draft only when every draft was accepted."""

    def __init__(self, model: EarlyExitModel, final_hidden: torch.Tensor | None,
                 known: list[torch.Tensor] | None = None,
                 last: Callable[[], torch.Tensor] | None = None, eager: bool = False):
        self.model, self.hidden, self.last, self.eager = model, final_hidden, last, eager
        self.rows: dict[int, torch.Tensor] = dict(enumerate(known or []))
        self.size = len(self.rows) if final_hidden is None else final_hidden.shape[1]

    def ready(self) -> int:
        """Computes what needs no decision about the drafts (position 0; every position of
        the hidden states when eager) and returns how many leading positions are available."""
        if self.size:
            self[0]
        n = 0
        while n in self.rows:
            n += 1
        return n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i not in self.rows:
            if i >= self.size:
                assert self.last is not None and i == self.size
                self.rows[i] = self.last()
                return self.rows[i]
            lo = 0 if i == 0 or self.eager else 1
            hi = 1 if i == 0 and not self.eager else self.size
            out = self.model.logits(self.hidden[:, lo:hi])
            for j in range(lo, hi):
                self.rows.setdefault(j, out[:, j - lo])
        return self.rows[i]


class RowLogits:
    """One row's view of `VerifyLogits` (the sampling rule runs per row)."""

    def __init__(self, target: VerifyLogits, row: int):
        self.target, self.row = target, row

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.target[i][self.row]


def verify_all_layers(model: EarlyExitModel, cache: StaticKVCache, rows: Rows, drafts: Drafts,
                      eager: bool) -> VerifyLogits:
    """Verification with a separate drafter (a draft model, prompt lookup): every layer over
    each row's pending token and drafts, in one forward."""
    ids = torch.cat([rows.pending(model.device), drafts.tensor.to(model.device)], dim=1)
    return VerifyLogits(model, model.run_layers(model.embed(ids), cache, 0, model.num_layers),
                        eager=eager)


# `defer_last_draft` (lsbench.engine.policy) decides, per round, whether the self-speculator leaves
# its last draft out of verification (one decision per batch, from all rows' rounds so far).
#
# Cache invariant between rounds: every layer of the target cache holds exactly each row's
# committed tokens except the last one, which is the pending input of the next round.

class SelfSpeculator:
    """LayerSkip drafter: layers [0, E) + LM head draft; layers [E, L) verify.

    Drafting writes the shallow layers' KV into the shared cache and keeps each drafted
    token's hidden state after layer E-1 (the exit hidden-state cache), so verification runs
    only the deep layers for drafted tokens. The last draft has no cached state: it needs its
    shallow pass, and is verified with the others or, while full acceptance is rare, only
    once every other draft is accepted (see `defer_last_draft`).
    """

    def __init__(self, model: EarlyExitModel, cache: StaticKVCache, exit_layer: int, *,
                 eager_head: bool = False, defer_threshold: float | None = None):
        self.model, self.cache, self.exit_layer = model, cache, exit_layer
        self.eager_head, self.defer_threshold = eager_head, defer_threshold
        self.exit_hidden: list[torch.Tensor] = []
        self.exit_logits: list[torch.Tensor] = []
        self.rounds = self.full_rounds = 0

    def prefill(self, rows: Rows) -> None:
        """Nothing to do: the drafter is the target's own first layers."""

    def propose(self, rows: Rows, budgets: list[int], samplers: list[Sampler],
                on_host: bool) -> Drafts:
        m, e = self.model, self.exit_layer
        self.exit_hidden, self.exit_logits = [], []

        def step(ids: torch.Tensor, j: int) -> torch.Tensor:
            hidden = m.run_layers(m.embed(ids), self.cache, 0, e)
            self.exit_hidden.append(hidden)
            self.exit_logits.append(m.logits(hidden)[:, -1])
            return self.exit_logits[-1]

        return draft_steps(step, rows.pending(m.device), budgets, samplers, rows.stop, on_host)

    def verify(self, rows: Rows, drafts: Drafts) -> VerifyLogits:
        """Full-model logits at the pending tokens and at every draft."""
        m, e = self.model, self.exit_layer
        last = drafts.tensor[:, -1:] if drafts.width else rows.pending(m.device)

        def full_pass(cached: torch.Tensor | None) -> torch.Tensor:
            """The last draft's shallow pass, then the deep layers over the cached exit
            states (if any) and it."""
            hidden = m.run_layers(m.embed(last), self.cache, 0, e)
            if cached is not None:
                hidden = torch.cat([cached, hidden], dim=1)
            return m.run_layers(hidden, self.cache, e, m.num_layers)

        def deferred_logits() -> torch.Tensor:
            return m.logits(full_pass(None))[:, -1]

        eager = self.eager_head
        if e == m.num_layers:  # exiting at the last layer is the full model: reuse its logits
            return VerifyLogits(m, None, self.exit_logits, last=deferred_logits, eager=eager)
        cached = torch.cat(self.exit_hidden, dim=1) if self.exit_hidden else None
        if cached is None or not defer_last_draft(self.full_rounds, self.rounds, e,
                                                  m.num_layers, self.defer_threshold):
            return VerifyLogits(m, full_pass(cached), eager=eager)
        deep = m.run_layers(cached, self.cache, e, m.num_layers)
        return VerifyLogits(m, deep, last=deferred_logits, eager=eager)

    def end_round(self, rows: Rows, verdicts: list[tuple[list[int], int, int | None]]) -> None:
        self.cache.set_lengths(rows.cached())
        self.rounds += len(verdicts)
        self.full_rounds += sum(bool(d) and n == len(d) for d, n, _ in verdicts)


class DraftModelSpeculator:
    """Classic two-model speculative decoding; the draft model keeps its own cache."""

    def __init__(self, model: EarlyExitModel, cache: StaticKVCache, draft: EarlyExitModel,
                 rows: Rows, *, eager_head: bool = False, compiled: bool = False):
        self.model, self.cache, self.draft_model = model, cache, draft
        self.eager_head = eager_head
        # The draft model's forwards are 1 or 2 tokens (a fully accepted round's catch-up).
        self.draft_cache = draft.new_cache(len(rows), rows.capacity, rows.pads,
                                           max_step=compiled and 2)

    def prefill(self, rows: Rows) -> None:
        d = self.draft_model
        d.run_layers(d.embed(rows.padded(d.device)), self.draft_cache, 0, d.num_layers)

    def propose(self, rows: Rows, budgets: list[int], samplers: list[Sampler],
                on_host: bool) -> Drafts:
        d = self.draft_model
        # Feed what the draft has not seen yet: the pending token, and after a fully accepted
        # round also the last draft, whose KV the draft model never computed. Rows differ in
        # that, so the first step is right-padded and each row's last real position read.
        new = [c[self.draft_cache.get_seq_length(0, b):] for b, c in enumerate(rows.committed)]
        width = max(map(len, new))
        first = torch.tensor([t + t[-1:] * (width - len(t)) for t in new], device=d.device)
        last = torch.tensor([len(t) - 1 for t in new], device=d.device)

        def step(ids: torch.Tensor, j: int) -> torch.Tensor:
            hidden = d.run_layers(d.embed(ids), self.draft_cache, 0, d.num_layers)
            if j == 0:
                hidden = hidden[torch.arange(len(new), device=d.device), last][:, None]
                self.draft_cache.set_lengths([len(c) for c in rows.committed])  # drop padding
            return d.logits(hidden)[:, -1].to(self.model.device)

        return draft_steps(step, first, budgets, samplers, rows.stop, on_host)

    def verify(self, rows: Rows, drafts: Drafts) -> VerifyLogits:
        """Full-model logits at the pending tokens and at every draft."""
        return verify_all_layers(self.model, self.cache, rows, drafts, self.eager_head)

    def end_round(self, rows: Rows, verdicts: list) -> None:
        cached = rows.cached()
        self.cache.set_lengths(cached)
        self.draft_cache.set_lengths([min(self.draft_cache.get_seq_length(0, b), n)
                                      for b, n in enumerate(cached)])


class PromptLookupSpeculator:
    """Prompt-lookup drafter: copies what followed an earlier occurrence of the n-gram that
    ends a row's committed text (prompt + output; see `prompt_lookup`). No model work: with no
    match a row drafts nothing and its round is a plain decode step. Its q is a point mass on
    each draft, so sampling accepts a draft x with probability p(x) and resamples from p
    without x."""

    def __init__(self, model: EarlyExitModel, cache: StaticKVCache,
                 stop_token_ids: tuple[int, ...] = (), max_ngram: int = MAX_NGRAM, *,
                 eager_head: bool = False):
        self.model, self.cache, self.eager_head = model, cache, eager_head
        self.stop_token_ids, self.max_ngram = frozenset(stop_token_ids), max_ngram

    def prefill(self, rows: Rows) -> None:
        """Nothing to do: the drafter is a lookup in the committed tokens."""

    def draft(self, committed: list[int], k: int, sampler: Sampler):
        """One row's lookup: (drafts, their point-mass distributions when sampling)."""
        tokens = lookup_drafts(committed, k, max_ngram=self.max_ngram,
                               stop_token_ids=self.stop_token_ids)
        if sampler.greedy:
            return tokens, [None] * len(tokens)
        points = torch.zeros(len(tokens), self.model.vocab_size, device=self.model.device)
        points[torch.arange(len(tokens)), tokens] = 1.0
        return tokens, list(points)

    def propose(self, rows: Rows, budgets: list[int], samplers: list[Sampler],
                on_host: bool) -> Drafts:
        """The lookups run on the host: their drafts are host ints already. Rows with fewer
        drafts are padded with their pending token (cut at acceptance)."""
        looked = [self.draft(c, n, s) if n else ([], [])
                  for c, n, s in zip(rows.committed, budgets, samplers, strict=True)]
        width = max(len(t) for t, _ in looked)
        tensor = torch.tensor([t + [c[-1]] * (width - len(t))
                               for (t, _), c in zip(looked, rows.committed, strict=True)],
                              dtype=torch.long, device=self.model.device)
        return Drafts(tensor, [t for t, _ in looked], [q for _, q in looked])

    def verify(self, rows: Rows, drafts: Drafts) -> VerifyLogits:
        """Full-model logits at the pending tokens and at every draft."""
        return verify_all_layers(self.model, self.cache, rows, drafts, self.eager_head)

    def end_round(self, rows: Rows, verdicts: list) -> None:
        self.cache.set_lengths(rows.cached())


Verdict = tuple[list[int], int, int | None]  # (row's drafts after `cut`, accepted, next token)


def accept(drafts: list[int], draft_probs: list, target_logits, sampler: Sampler
           ) -> tuple[int, int | None]:
    """Sampling acceptance of one row: (accepted drafts, next token) from the full model's
    logits at each drafted position (`RowLogits`). The next token is None when every draft is
    accepted and the last one is a stop token: generation ends there, so the bonus token is
    neither computed nor emitted."""
    for i, token in enumerate(drafts):
        p, q = sampler.probs(target_logits[i]), draft_probs[i]
        # Standard speculative rejection rule: accept with min(1, p/q), else resample from
        # norm(max(0, p - q)); the output is distributed exactly as the target's.
        if sampler.uniform() * float(q[token]) < float(p[token]):
            continue
        residual = (p - q).clamp_min(0)
        return i, sampler.draw(residual / residual.sum() if residual.sum() > 0 else p)
    if drafts and drafts[-1] in sampler.cfg.stop_token_ids:
        return len(drafts), None
    return len(drafts), sampler.draw(sampler.probs(target_logits[len(drafts)]))


def accept_greedy(drafts: Drafts, budgets: list[int], target: VerifyLogits,
                  stop: frozenset[int], active: list[int]) -> dict[int, Verdict]:
    """Greedy acceptance of every active row with one device-to-host transfer: the drafts (if
    still on the device) and the argmax of every position the verify head computed without a
    decision about the drafts, compared on the host. A lazy head's positions after 0 (only
    once some row accepts its first draft) and a deferred last draft's bonus position (only
    once some row accepts every draft) each cost one more transfer, in the rounds that need
    them."""
    n = drafts.width
    ready = torch.stack([target[i] for i in range(target.ready() if n else 1)]).argmax(-1)
    if drafts.host is None:
        host = torch.cat([drafts.tensor.T.to(ready.device), ready]).tolist()
        proposed = [[host[i][b] for i in range(n)] for b in range(len(budgets))]
        best = host[n:]
    else:
        proposed, best = drafts.host, ready.tolist()

    def best_at(i: int, b: int) -> int:
        if i >= len(best):
            hi = max(i + 1, target.size)
            best.extend(torch.stack([target[j] for j in range(len(best), hi)]).argmax(-1)
                        .tolist())
        return best[i][b]

    verdicts = {}
    for b in active:
        row = cut(proposed[b], budgets[b], stop)
        n_ok = next((i for i, token in enumerate(row) if best_at(i, b) != token), len(row))
        if n_ok < len(row):
            verdicts[b] = (row, n_ok, best[n_ok][b])
        else:
            verdicts[b] = (row, n_ok, None if row and row[-1] in stop else best_at(n_ok, b))
    return verdicts


def accept_round(drafts: Drafts, budgets: list[int], target: VerifyLogits,
                 samplers: list[Sampler], stop: frozenset[int],
                 active: list[int]) -> dict[int, Verdict]:
    """Every active row's verdict: greedy on the device, sampling row by row."""
    if samplers[0].greedy:
        return accept_greedy(drafts, budgets, target, stop, active)
    verdicts = {}
    for b in active:
        row = cut(drafts.host[b], budgets[b], stop)
        n_ok, token = accept(row, drafts.probs[b] if drafts.probs else [],
                             RowLogits(target, b), samplers[b])
        verdicts[b] = (row, n_ok, token)
    return verdicts


class DraftTimer:
    """Seconds spent proposing, without a sync per round: CUDA events on a GPU (read once,
    after the final sync), the host clock elsewhere (a CPU's work is done when it returns)."""

    def __init__(self, device: torch.device):
        self.cuda, self.spans, self.host = device.type == "cuda", [], 0.0

    def __enter__(self) -> None:
        if self.cuda:
            self.spans.append([torch.cuda.Event(enable_timing=True),
                               torch.cuda.Event(enable_timing=True)])
            self.spans[-1][0].record()
        else:
            self._t = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.spans[-1][1].record()
        else:
            self.host += time.perf_counter() - self._t

    def seconds(self) -> float:
        return self.host + sum(a.elapsed_time(b) for a, b in self.spans) / 1000.0


def make_speculator(model: EarlyExitModel, cache: StaticKVCache, rows: Rows,
                    policy: EnginePolicy | None, *, exit_layer: int | None,
                    draft: EarlyExitModel | None, prompt_lookup: bool, compiled: bool):
    """The drafter by kind, with the policy's head shape and deferral break-even."""
    eager = policy is not None and policy.eager_head
    if draft is not None:
        check_draft_vocabulary(model, draft)
        return DraftModelSpeculator(model, cache, draft, rows, eager_head=eager,
                                    compiled=compiled)
    if prompt_lookup:
        return PromptLookupSpeculator(model, cache, rows.cfg.stop_token_ids, eager_head=eager)
    check_exit_layers([exit_layer], model.num_layers)
    threshold = None
    if policy is not None and exit_layer < model.num_layers:
        threshold = policy.defer_threshold(exit_layer, model.num_layers)
    return SelfSpeculator(model, cache, exit_layer, eager_head=eager, defer_threshold=threshold)


@torch.inference_mode()
def decode_speculative(model: EarlyExitModel, prompts: list[list[int]], cfg: DecodingConfig,
                       k: int, *, exit_layer: int | None = None,
                       draft: EarlyExitModel | None = None, prompt_lookup: bool = False,
                       on_round: Callable[[object, list[int]], None] | None = None,
                       policy: EnginePolicy | None = None,
                       device_loop: bool | None = None, compiled: bool = False) -> BatchRun:
    """`layerskip` when exit_layer is given, `spec` when a draft model is given, `pld` with
    prompt_lookup; see `generate_speculative` for policy and device_loop."""
    if k < 1:
        raise LsbenchError(f"number of speculations must be >= 1, got {k}")
    rows = Rows(prompts, cfg, k)
    samplers = [Sampler(cfg, model.device, b) for b in range(len(rows))]
    device_loop = (model.device.type != "cpu" if device_loop is None else device_loop)
    device_loop = device_loop and samplers[0].greedy
    policy = policy if policy is not None else model.engine_policies.get(k)
    # Compiled: every decoding forward (1..k+1 tokens) runs the compiled layer step.
    cache = model.new_cache(len(rows), rows.capacity, rows.pads, max_step=compiled and k + 1)
    spec = make_speculator(model, cache, rows, policy, exit_layer=exit_layer, draft=draft,
                           prompt_lookup=prompt_lookup, compiled=compiled)
    clock, timer = Clock(model, draft), DraftTimer(model.device)
    clock.mark()
    start(model, rows, cache, samplers)
    spec.prefill(rows)
    t1 = clock.mark()
    while active := rows.running():
        budgets = [rows.budget(b, k) for b in range(len(rows))]  # never past max_new_tokens
        with timer:
            drafts = spec.propose(rows, budgets, samplers, on_host=not device_loop)
        verdicts = accept_round(drafts, budgets, spec.verify(rows, drafts), samplers,
                                rows.stop, active)
        now = time.perf_counter() - t1  # every verdict is on the host: the work is done
        for b, (row, n_ok, token) in verdicts.items():
            # A stop token can only be a row's last draft: then the round emits n_ok tokens
            # instead of n_ok + 1 and the row ends.
            rows.emit(b, [*row[:n_ok], *([] if token is None else [token])], now)
            rows.drafted[b].append(len(row))
            rows.accepted[b].append(n_ok)
        spec.end_round(rows, list(verdicts.values()))
        if on_round is not None:
            on_round(cache, rows.committed[0])
    clock.mark()
    prefill_s, decode_s = clock.seconds()
    caches = [cache, *([spec.draft_cache] if draft is not None else [])]
    return BatchRun(rows.generations(
        prefill_s, clock.counts(), caches, draft_s=timer.seconds(), eager_head=spec.eager_head,
        defer_threshold=getattr(spec, "defer_threshold", None), device_loop=device_loop,
        compiled=compiled),
        prefill_s, decode_s)


def generate_speculative(model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig,
                         k: int, **kwargs) -> Generation:
    """Batch-1 `decode_speculative`.

    policy: the verify head's shape and the deferral break-even (`lsbench.engine.policy`); by
    default the model's calibration at this k (`costs.calibrate`), else the lazy head and the
    E/L rule. device_loop (default: greedy on a non-CPU device): drafts stay on the device and
    each round hands the drafts and the verify argmaxes to the host in one transfer
    (`accept_greedy`). Drafting then runs the whole budget and cuts after the first stop
    token, so only a round that drafts a stop token does more layer work than the host loop
    (its drafts after the stop token, counted in the layer counts); rounds, drafts verified,
    accepted counts and deferrals are the same. On the host loop (CPU, where a sync costs
    nothing, and sampling) every drafted token is read as it is drafted. `draft_s` sums the
    time spent proposing in both (`DraftTimer`)."""
    return decode_speculative(model, [prompt_ids], cfg, k, **kwargs).rows[0]


def is_compile_error(error: Exception) -> bool:
    """What a failed torch.compile raises: dynamo and inductor errors, a missing or broken C++
    compiler. Imported only when the compiled engine ran (dynamo is slow to import)."""
    import torch._dynamo.exc
    import torch._inductor.exc

    return isinstance(error, (torch._dynamo.exc.TorchDynamoException,
                              torch._inductor.exc.InductorError,
                              torch._inductor.exc.InvalidCxxCompiler,
                              torch._inductor.exc.CppCompileError))


def decode(strategy: str, model: EarlyExitModel, prompts: list[list[int]], cfg: DecodingConfig,
           *, k: int = 4, exit_layer: int | None = None, draft: EarlyExitModel | None = None,
           compiled: bool = False) -> BatchRun:
    """Decode a batch with one of lsbench's own strategies; `compiled`: the decoding forwards
    through the compiled layer step (`EarlyExitModel.compile_layers`). A compilation failure
    is one error line."""
    try:
        if strategy == "ar":
            return decode_ar(model, prompts, cfg, compiled=compiled)
        if strategy == "exit":
            check_exit_layers([exit_layer], model.num_layers)
            return decode_ar(model, prompts, cfg, depth=exit_layer, compiled=compiled)
        if strategy == "spec" and draft is None:
            raise LsbenchError("strategy 'spec' needs a draft model")
        if strategy in ("layerskip", "pld", "spec"):
            return decode_speculative(
                model, prompts, cfg, k, exit_layer=exit_layer, prompt_lookup=strategy == "pld",
                draft=draft if strategy == "spec" else None, compiled=compiled)
    except Exception as e:
        if not (compiled and is_compile_error(e)):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise LsbenchError(f"compiling the decoder layers failed ({type(e).__name__}: {first}); "
                           f"run with --no-compile") from None
    raise LsbenchError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")


def generate(strategy: str, model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig, *,
             k: int = 4, exit_layer: int | None = None,
             draft: EarlyExitModel | None = None, compiled: bool = False) -> Generation:
    """Run one strategy by name on one prompt; `compiled`: through the compiled forwards
    (lsbench's own strategies; transformers' references run as they are)."""
    if strategy in HF_STRATEGIES:
        return generate_hf(model, prompt_ids, cfg, strategy, k=k, exit_layer=exit_layer,
                           draft=draft)
    return decode(strategy, model, [prompt_ids], cfg, k=k, exit_layer=exit_layer,
                  draft=draft, compiled=compiled).rows[0]
