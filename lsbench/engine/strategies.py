"""lsbench's decoding loops. Read top to bottom: sampling, prefill, the autoregressive loop
(and the lossy early exit, the same loop through fewer layers), the speculative loop with its
three drafters (a separate draft model; the model's own early exit sharing one KV cache;
prompt lookup, which costs no model work), then `generate`, which runs a strategy by name
(transformers' `generate()` references live in `hf_reference`).

Every strategy returns a `Generation`: raw facts only (tokens, seconds, per-round counts,
layer-token evaluations). Derived metrics are computed elsewhere from these.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from lsbench.backend.early_exit import EarlyExitModel, check_draft_vocabulary, check_exit_layers
from lsbench.backend.kv_cache import cache_bytes, cache_capacity_bytes, crop_cache
from lsbench.engine.generation import DecodingConfig, Generation, prompt_tensor, sync
from lsbench.engine.hf_reference import HF_STRATEGIES, generate_hf
from lsbench.engine.policy import EnginePolicy, defer_last_draft
from lsbench.engine.prompt_lookup import MAX_NGRAM, lookup_drafts
from lsbench.errors import LsbenchError

STRATEGIES = ("ar", "spec", "layerskip", "pld", "exit", *HF_STRATEGIES)
LOSSY = ("exit",)  # strategies whose output may differ from the full model's by design


# --- sampling -------------------------------------------------------------------------------

class Sampler:
    """Greedy argmax or temperature/top-k/top-p sampling from a seeded generator."""

    def __init__(self, cfg: DecodingConfig, device: torch.device):
        self.cfg = cfg
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)

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


# --- prefill and autoregressive decoding ----------------------------------------------------

def prefill(model: EarlyExitModel, prompt: torch.Tensor, cache,
            depth: int | None = None) -> torch.Tensor:
    """Layers [0, depth) (all by default) over the prompt; logits of its last position only."""
    hidden = model.run_layers(model.embed(prompt), cache, 0,
                              model.num_layers if depth is None else depth)
    return model.logits(hidden[:, -1:])[0, -1]


@torch.inference_mode()
def generate_ar(model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig, *,
                depth: int | None = None) -> Generation:
    """Autoregressive decoding through layers [0, depth) + final norm + LM head; all layers by
    default, the lossy early exit (`generate_exit`) otherwise."""
    depth = model.num_layers if depth is None else depth
    sampler = Sampler(cfg, model.device)
    cache = model.new_cache()
    counts0 = model.counts.copy()
    sync(model.device)
    t0 = time.perf_counter()
    token, _ = sampler.pick(prefill(model, prompt_tensor(model, prompt_ids), cache, depth))
    sync(model.device)
    t1 = time.perf_counter()
    counts1 = model.counts.copy()
    out, step_end_s = [token], []
    while len(out) < cfg.max_new_tokens and token not in cfg.stop_token_ids:
        ids = torch.tensor([[token]], device=model.device)
        hidden = model.run_layers(model.embed(ids), cache, 0, depth)
        token, _ = sampler.pick(model.logits(hidden)[0, -1])  # a host transfer: work is done
        out.append(token)
        step_end_s.append(time.perf_counter() - t1)
    sync(model.device)
    t2 = time.perf_counter()
    return Generation(out, t1 - t0, t2 - t1, len(out) - 1,
                      step_end_s=step_end_s, step_tokens=[1] * len(step_end_s),
                      prefill_counts=counts1.minus(counts0),
                      decode_counts=model.counts.minus(counts1),
                      kv_cache_bytes=cache_bytes(cache),
                      kv_cache_capacity_bytes=cache_capacity_bytes(cache))


def generate_exit(model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig,
                  exit_layer: int) -> Generation:
    """Early exit without verification (lossy): layers [0, E) + final norm + LM head for every
    token. The prompt is prefilled through [0, E) only: the deep layers never run, which is
    what exiting early means (and what the LayerSkip repository's exit-layer decoding does)."""
    check_exit_layers([exit_layer], model.num_layers)
    return generate_ar(model, prompt_ids, cfg, depth=exit_layer)


# --- speculative decoding: one propose/verify loop, three drafters --------------------------

class VerifyLogits:
    """The full model's logits at each verified position, computed on demand. Lazy (the
    default): position 0 alone, the rest in one batch only if the first draft is accepted;
    with low acceptance most rounds pay for one LM-head row instead of k+1 (on a CPU a
    k+1-row head costs about k+1 times one row). Eager: every row in one call, where the
    measured head costs about the same at k+1 rows as at one (`policy.EnginePolicy`). Rows
    past `final_hidden` (or `known`) come from `last`, which the self-speculator uses to run
    the last draft only when every draft was accepted."""

    def __init__(self, model: EarlyExitModel, final_hidden: torch.Tensor | None,
                 known: list[torch.Tensor] | None = None,
                 last: Callable[[], torch.Tensor] | None = None, eager: bool = False):
        self.model, self.hidden, self.last, self.eager = model, final_hidden, last, eager
        self.rows: dict[int, torch.Tensor] = dict(enumerate(known or []))
        self.size = len(self.rows) if final_hidden is None else final_hidden.shape[1]

    def ready(self) -> int:
        """Computes what needs no decision about the drafts (row 0; every row of the hidden
        states when eager) and returns how many leading rows are available."""
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
            for j, row in enumerate(self.model.logits(self.hidden[:, lo:hi])[0], start=lo):
                self.rows.setdefault(j, row)
        return self.rows[i]


# `defer_last_draft` (lsbench.engine.policy) decides, per round, whether the self-speculator leaves
# its last draft out of verification.
#
# Cache invariant between rounds: every layer of the target cache holds exactly the committed
# tokens except the last one, which is the pending input of the next round.

class SelfSpeculator:
    """LayerSkip drafter: layers [0, E) + LM head draft; layers [E, L) verify.

    Drafting writes the shallow layers' KV into the shared cache and keeps each drafted
    token's hidden state after layer E-1 (the exit hidden-state cache), so verification runs
    only the deep layers for drafted tokens. The last draft has no cached state: it needs its
    shallow pass, and is verified with the others or, while full acceptance is rare, only
    once every other draft is accepted (see `defer_last_draft`).
    """

    def __init__(self, model: EarlyExitModel, cache, exit_layer: int, *,
                 eager_head: bool = False, defer_threshold: float | None = None):
        self.model, self.cache, self.exit_layer = model, cache, exit_layer
        self.eager_head, self.defer_threshold = eager_head, defer_threshold
        self.exit_hidden: list[torch.Tensor] = []
        self.exit_logits: list[torch.Tensor] = []
        self.rounds = self.full_rounds = 0

    def prefill(self, prompt: torch.Tensor) -> None:
        """Nothing to do: the drafter is the target's own first layers."""

    def draft(self, committed: list[int], k: int, sampler: Sampler):
        m, e = self.model, self.exit_layer
        self.exit_hidden, self.exit_logits = [], []
        tokens, probs, token = [], [], committed[-1]
        for _ in range(k):
            hidden = m.run_layers(m.embed(self._ids(token)), self.cache, 0, e)
            logits = m.logits(hidden)[0, -1]
            self.exit_hidden.append(hidden)
            self.exit_logits.append(logits)
            token, q = sampler.pick(logits)
            tokens.append(token)
            probs.append(q)
            if token in sampler.cfg.stop_token_ids:  # nothing is drafted after a stop token
                break
        return tokens, probs

    def draft_on_device(self, committed: list[int], k: int) -> torch.Tensor:
        """Greedy drafts as a device tensor, without a host sync: each argmax is fed back
        as the next input. All k are drafted; `accept_on_device` cuts after a stop token."""
        m, e = self.model, self.exit_layer
        self.exit_hidden, self.exit_logits = [], []
        ids, tokens = self._ids(committed[-1]), []
        for _ in range(k):
            hidden = m.run_layers(m.embed(ids), self.cache, 0, e)
            logits = m.logits(hidden)[0, -1]
            self.exit_hidden.append(hidden)
            self.exit_logits.append(logits)
            ids = logits.argmax().view(1, 1)
            tokens.append(ids.view(1))
        return _cat_tokens(tokens, m.device)

    def verify(self, committed: list[int], drafts: Sequence[int] | torch.Tensor) -> VerifyLogits:
        """Full-model logits at the pending token and at every draft."""
        m, e = self.model, self.exit_layer
        last = self._ids(drafts[-1] if len(drafts) else committed[-1])

        def full_pass(cached: torch.Tensor | None) -> torch.Tensor:
            """The last draft's shallow pass, then the deep layers over the cached exit
            states (if any) and it."""
            hidden = m.run_layers(m.embed(last), self.cache, 0, e)
            if cached is not None:
                hidden = torch.cat([cached, hidden], dim=1)
            return m.run_layers(hidden, self.cache, e, m.num_layers)

        def deferred_logits() -> torch.Tensor:
            return m.logits(full_pass(None))[0, -1]

        eager = self.eager_head
        if e == m.num_layers:  # exiting at the last layer is the full model: reuse its logits
            return VerifyLogits(m, None, self.exit_logits, last=deferred_logits, eager=eager)
        cached = torch.cat(self.exit_hidden, dim=1) if self.exit_hidden else None
        if cached is None or not defer_last_draft(self.full_rounds, self.rounds, e,
                                                  m.num_layers, self.defer_threshold):
            return VerifyLogits(m, full_pass(cached), eager=eager)
        deep = m.run_layers(cached, self.cache, e, m.num_layers)
        return VerifyLogits(m, deep, last=deferred_logits, eager=eager)

    def end_round(self, cached_len: int, all_accepted: bool) -> None:
        crop_cache(self.cache, cached_len)
        self.rounds += 1
        self.full_rounds += all_accepted

    def _ids(self, token: int | torch.Tensor) -> torch.Tensor:
        if isinstance(token, torch.Tensor):  # a drafted token still on the device
            return token.reshape(1, 1)
        return torch.tensor([[token]], device=self.model.device)


def _cat_tokens(tokens: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat(tokens) if tokens else torch.empty(0, dtype=torch.long, device=device)


def _verify_ids(model: EarlyExitModel, committed: list[int],
                drafts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The pending token and the drafts as one 1 x (n+1) input."""
    if isinstance(drafts, torch.Tensor):
        pending = torch.tensor([committed[-1]], device=model.device)
        return torch.cat([pending, drafts.to(model.device)]).view(1, -1)
    return torch.tensor([[committed[-1], *drafts]], device=model.device)


def verify_all_layers(model: EarlyExitModel, cache, committed: list[int],
                      drafts: Sequence[int] | torch.Tensor, eager: bool) -> VerifyLogits:
    """Verification with a separate drafter (a draft model, prompt lookup): every layer over
    the pending token and the drafts, in one forward."""
    ids = _verify_ids(model, committed, drafts)
    return VerifyLogits(model, model.run_layers(model.embed(ids), cache, 0, model.num_layers),
                        eager=eager)


class DraftModelSpeculator:
    """Classic two-model speculative decoding; the draft model keeps its own cache."""

    def __init__(self, model: EarlyExitModel, cache, draft: EarlyExitModel, *,
                 eager_head: bool = False):
        self.model, self.cache, self.draft_model = model, cache, draft
        self.eager_head = eager_head
        self.draft_cache = draft.new_cache()

    def prefill(self, prompt: torch.Tensor) -> None:
        d = self.draft_model
        d.run_layers(d.embed(prompt.to(d.device)), self.draft_cache, 0, d.num_layers)

    def draft(self, committed: list[int], k: int, sampler: Sampler):
        d = self.draft_model
        # Feed what the draft has not seen yet: the pending token, and after a fully accepted
        # round also the last draft, whose KV the draft model never computed.
        new = committed[self.draft_cache.get_seq_length(0):]
        tokens, probs = [], []
        for _ in range(k):
            ids = torch.tensor([new], device=d.device)
            hidden = d.run_layers(d.embed(ids), self.draft_cache, 0, d.num_layers)
            token, q = sampler.pick(d.logits(hidden[:, -1:])[0, -1].to(self.model.device))
            tokens.append(token)
            probs.append(q)
            if token in sampler.cfg.stop_token_ids:  # nothing is drafted after a stop token
                break
            new = [token]
        return tokens, probs

    def draft_on_device(self, committed: list[int], k: int) -> torch.Tensor:
        """Greedy drafts as a device tensor, each argmax fed back without a host sync."""
        d = self.draft_model
        ids = torch.tensor([committed[self.draft_cache.get_seq_length(0):]], device=d.device)
        tokens = []
        for _ in range(k):
            hidden = d.run_layers(d.embed(ids), self.draft_cache, 0, d.num_layers)
            ids = d.logits(hidden[:, -1:])[0, -1].argmax().view(1, 1)
            tokens.append(ids.view(1).to(self.model.device))
        return _cat_tokens(tokens, self.model.device)

    def verify(self, committed: list[int], drafts: Sequence[int] | torch.Tensor) -> VerifyLogits:
        """Full-model logits at the pending token and at every draft."""
        return verify_all_layers(self.model, self.cache, committed, drafts, self.eager_head)

    def end_round(self, cached_len: int, all_accepted: bool) -> None:
        crop_cache(self.cache, cached_len)
        crop_cache(self.draft_cache, cached_len)


class PromptLookupSpeculator:
    """Prompt-lookup drafter: copies what followed an earlier occurrence of the n-gram that
    ends the committed text (prompt + output; see `prompt_lookup`). No model work: with no
    match a round drafts nothing and is a plain decode step. Its q is a point mass on each
    draft, so sampling accepts a draft x with probability p(x) and resamples from p without x.
    """

    def __init__(self, model: EarlyExitModel, cache, stop_token_ids: tuple[int, ...] = (),
                 max_ngram: int = MAX_NGRAM, *, eager_head: bool = False):
        self.model, self.cache, self.eager_head = model, cache, eager_head
        self.stop_token_ids, self.max_ngram = frozenset(stop_token_ids), max_ngram

    def prefill(self, prompt: torch.Tensor) -> None:
        """Nothing to do: the drafter is a lookup in the committed tokens."""

    def draft(self, committed: list[int], k: int, sampler: Sampler):
        tokens = lookup_drafts(committed, k, max_ngram=self.max_ngram,
                               stop_token_ids=self.stop_token_ids)
        if sampler.greedy:
            return tokens, [None] * len(tokens)
        points = torch.zeros(len(tokens), self.model.vocab_size, device=self.model.device)
        points[torch.arange(len(tokens)), tokens] = 1.0
        return tokens, list(points)

    def draft_on_device(self, committed: list[int], k: int) -> list[int]:
        """The lookup runs on the host: its drafts are host ints already."""
        return lookup_drafts(committed, k, max_ngram=self.max_ngram,
                             stop_token_ids=self.stop_token_ids)

    def verify(self, committed: list[int], drafts: Sequence[int] | torch.Tensor) -> VerifyLogits:
        """Full-model logits at the pending token and at every draft."""
        return verify_all_layers(self.model, self.cache, committed, drafts, self.eager_head)

    def end_round(self, cached_len: int, all_accepted: bool) -> None:
        crop_cache(self.cache, cached_len)


def accept(drafts: list[int], draft_probs: list, target_logits: VerifyLogits,
           sampler: Sampler) -> tuple[int, int | None]:
    """(accepted drafts, next token) from the full model's logits at each drafted position.
    The next token is None when every draft is accepted and the last one is a stop token:
    generation ends there, so the bonus token is neither computed nor emitted."""
    stop_last = bool(drafts) and drafts[-1] in sampler.cfg.stop_token_ids
    if sampler.greedy:
        for i, token in enumerate(drafts):
            best = int(target_logits[i].argmax())
            if best != token:
                return i, best
        return len(drafts), None if stop_last else int(target_logits[len(drafts)].argmax())
    for i, token in enumerate(drafts):
        p, q = sampler.probs(target_logits[i]), draft_probs[i]
        # Standard speculative rejection rule: accept with min(1, p/q), else resample from
        # norm(max(0, p - q)); the output is distributed exactly as the target's.
        if sampler.uniform() * float(q[token]) < float(p[token]):
            continue
        residual = (p - q).clamp_min(0)
        return i, sampler.draw(residual / residual.sum() if residual.sum() > 0 else p)
    if stop_last:
        return len(drafts), None
    return len(drafts), sampler.draw(sampler.probs(target_logits[len(drafts)]))


def _argmax_to_host(drafts: Sequence[int] | torch.Tensor, target: VerifyLogits,
                    lo: int, hi: int) -> tuple[list[int], list[int]]:
    """Device drafts (if still there) and the argmax of rows [lo, hi), in one transfer."""
    best = torch.stack([target[i] for i in range(lo, hi)]).argmax(-1)
    if isinstance(drafts, torch.Tensor):
        host = torch.cat([drafts.to(best.device), best]).tolist()
        return host[:len(drafts)], host[len(drafts):]
    return list(drafts), best.tolist()


def accept_on_device(drafts: Sequence[int] | torch.Tensor, target: VerifyLogits,
                     stop_token_ids: Sequence[int]) -> tuple[list[int], int, int | None]:
    """Greedy `accept` with one device-to-host transfer: the drafts and the argmax of every
    row the verify head computed without a decision about the drafts, compared on the host.
    A lazy head's rows after row 0 (only once the first draft is accepted) and a deferred
    last draft's bonus row (only once every draft is accepted) each cost one more transfer,
    in the rounds that need them. Returns (drafts cut after their first stop token, accepted
    drafts, next token), the last as in `accept`."""
    n = len(drafts)
    drafts, best = _argmax_to_host(drafts, target, 0, target.ready() if n else 1)
    for i, token in enumerate(drafts):
        if token in stop_token_ids:  # drafting on the device did not stop there: cut here
            drafts = drafts[:i + 1]
            break
    n = len(drafts)

    def best_at(i: int) -> int:
        if i >= len(best):
            best.extend(_argmax_to_host([], target, len(best), max(i + 1, target.size))[1])
        return best[i]

    for i, token in enumerate(drafts):
        if best_at(i) != token:
            return drafts, i, best[i]
    if n and drafts[-1] in stop_token_ids:
        return drafts, n, None
    return drafts, n, best_at(n)


@torch.inference_mode()
def generate_speculative(model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig, k: int,
                         *, exit_layer: int | None = None, draft: EarlyExitModel | None = None,
                         prompt_lookup: bool = False,
                         on_round: Callable[[object, list[int]], None] | None = None,
                         policy: EnginePolicy | None = None,
                         device_loop: bool | None = None) -> Generation:
    """`layerskip` when exit_layer is given, `spec` when a draft model is given, `pld` with
    prompt_lookup.

    policy: the verify head's shape and the deferral break-even (`lsbench.engine.policy`); by
    default the model's calibration at this k (`costs.calibrate`), else the lazy head and the
    E/L rule. device_loop (default: greedy on a non-CPU device): drafts stay on the device and
    each round hands the drafts and the verify argmaxes to the host in one transfer
    (`accept_on_device`). Drafting then runs the whole budget and cuts after the first stop
    token, so only a round that drafts a stop token does more layer work than the host loop
    (its drafts after the stop token, counted in the layer counts); rounds, drafts verified,
    accepted counts and deferrals are the same. On the host loop (CPU, where a sync costs
    nothing, and sampling) every token is a Python int as it is drafted.

    `draft_s` sums the time spent proposing: the host loop's drafters hand back Python ints,
    so the device has finished the draft work when the timer reads. The device loop cannot
    time it without a sync per round: its `draft_s` is NaN."""
    if k < 1:
        raise LsbenchError(f"number of speculations must be >= 1, got {k}")
    sampler = Sampler(cfg, model.device)
    if device_loop is None:
        device_loop = model.device.type != "cpu"
    device_loop = device_loop and sampler.greedy
    policy = policy if policy is not None else model.engine_policies.get(k)
    eager = policy is not None and policy.eager_head
    threshold = None
    cache = model.new_cache()
    if draft is not None:
        check_draft_vocabulary(model, draft)
        speculator = DraftModelSpeculator(model, cache, draft, eager_head=eager)
    elif prompt_lookup:
        speculator = PromptLookupSpeculator(model, cache, cfg.stop_token_ids, eager_head=eager)
    else:
        check_exit_layers([exit_layer], model.num_layers)
        if policy is not None and exit_layer < model.num_layers:
            threshold = policy.defer_threshold(exit_layer, model.num_layers)
        speculator = SelfSpeculator(model, cache, exit_layer, eager_head=eager,
                                    defer_threshold=threshold)
    drafter_counts = draft.counts if draft is not None else None
    c0, d0 = model.counts.copy(), drafter_counts.copy() if drafter_counts else None

    sync(model.device)
    t0 = time.perf_counter()
    prompt = prompt_tensor(model, prompt_ids)
    token, _ = sampler.pick(prefill(model, prompt, cache))
    speculator.prefill(prompt)
    sync(model.device)
    t1 = time.perf_counter()
    c1, d1 = model.counts.copy(), drafter_counts.copy() if drafter_counts else None

    committed = [*prompt_ids, token]
    out, drafted, accepted, draft_s = [token], [], [], 0.0
    step_end_s, step_tokens = [], []
    while len(out) < cfg.max_new_tokens and out[-1] not in cfg.stop_token_ids:
        budget = min(k, cfg.max_new_tokens - len(out) - 1)  # never draft past max_new_tokens
        if device_loop:
            on_device = speculator.draft_on_device(committed, budget)
            drafts, n_ok, token = accept_on_device(
                on_device, speculator.verify(committed, on_device), cfg.stop_token_ids)
        else:
            proposing = time.perf_counter()
            drafts, probs = speculator.draft(committed, budget, sampler)
            draft_s += time.perf_counter() - proposing
            n_ok, token = accept(drafts, probs, speculator.verify(committed, drafts), sampler)
        # Drafting stops at a stop token, so one can only be the last draft: then the round
        # emits n_ok tokens instead of n_ok + 1 and generation ends.
        new = [*drafts[:n_ok], *([] if token is None else [token])]
        committed += new
        out += new
        drafted.append(len(drafts))
        accepted.append(n_ok)
        # A round without drafts (the budget's last token) says nothing about acceptance.
        speculator.end_round(len(committed) - 1, all_accepted=bool(drafts) and n_ok == len(drafts))
        # Both loops have the round's tokens on the host here, so its work is finished.
        step_end_s.append(time.perf_counter() - t1)
        step_tokens.append(len(new))
        if on_round is not None:
            on_round(cache, committed)
    sync(model.device)
    t2 = time.perf_counter()
    caches = (cache, getattr(speculator, "draft_cache", None))
    return Generation(
        out, t1 - t0, t2 - t1, len(out) - 1, drafted, accepted,
        prefill_counts=c1.minus(c0), decode_counts=model.counts.minus(c1),
        draft_prefill_counts=d1.minus(d0) if d0 else None,
        draft_decode_counts=drafter_counts.minus(d1) if d1 else None,
        draft_s=math.nan if device_loop else draft_s,
        step_end_s=step_end_s, step_tokens=step_tokens,
        eager_head=eager, defer_threshold=threshold, device_loop=device_loop,
        kv_cache_bytes=cache_bytes(*caches),
        # Buffers only grow (a rollback is a view), so the end is the peak.
        kv_cache_capacity_bytes=cache_capacity_bytes(*caches),
    )


def generate(strategy: str, model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig, *,
             k: int = 4, exit_layer: int | None = None,
             draft: EarlyExitModel | None = None, compiled: bool = False) -> Generation:
    """Run one strategy by name; `compiled`: through the compiled forwards."""
    if compiled:  # CONTRACT: the compiled engine (issue 19) replaces this refusal
        raise LsbenchError("the compiled engine is not built yet; run with --no-compile")
    if strategy == "ar":
        return generate_ar(model, prompt_ids, cfg)
    if strategy == "layerskip":
        return generate_speculative(model, prompt_ids, cfg, k, exit_layer=exit_layer)
    if strategy == "pld":
        return generate_speculative(model, prompt_ids, cfg, k, prompt_lookup=True)
    if strategy == "exit":
        return generate_exit(model, prompt_ids, cfg, exit_layer)
    if strategy == "spec":
        if draft is None:
            raise LsbenchError("strategy 'spec' needs a draft model")
        return generate_speculative(model, prompt_ids, cfg, k, draft=draft)
    if strategy in HF_STRATEGIES:
        return generate_hf(model, prompt_ids, cfg, strategy, k=k, exit_layer=exit_layer,
                           draft=draft)
    raise LsbenchError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
