"""lsbench's decoding loops. Read top to bottom: sampling, prefill, the autoregressive loop
(and the lossy early exit, the same loop through fewer layers), the speculative loop with its
three drafters (a separate draft model; the model's own early exit sharing one KV cache;
prompt lookup, which costs no model work), then `generate`, which runs a strategy by name
(transformers' `generate()` references live in `hf_reference`).

Every strategy returns a `Generation`: raw facts only (tokens, seconds, per-round counts,
layer-token evaluations). Derived metrics are computed elsewhere from these.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lsbench.errors import LsbenchError
from lsbench.generation import DecodingConfig, Generation, prompt_tensor, sync
from lsbench.hf_reference import HF_STRATEGIES, generate_hf
from lsbench.models import (
    EarlyExitModel,
    cache_bytes,
    check_draft_vocabulary,
    check_exit_layers,
    crop_cache,
)
from lsbench.prompt_lookup import MAX_NGRAM, lookup_drafts

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
    out = [token]
    while len(out) < cfg.max_new_tokens and token not in cfg.stop_token_ids:
        ids = torch.tensor([[token]], device=model.device)
        hidden = model.run_layers(model.embed(ids), cache, 0, depth)
        token, _ = sampler.pick(model.logits(hidden)[0, -1])
        out.append(token)
    sync(model.device)
    t2 = time.perf_counter()
    return Generation(out, t1 - t0, t2 - t1, len(out) - 1,
                      prefill_counts=counts1.minus(counts0),
                      decode_counts=model.counts.minus(counts1),
                      kv_cache_bytes=cache_bytes(cache))


def generate_exit(model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig,
                  exit_layer: int) -> Generation:
    """Early exit without verification (lossy): layers [0, E) + final norm + LM head for every
    token. The prompt is prefilled through [0, E) only: the deep layers never run, which is
    what exiting early means (and what the LayerSkip repository's exit-layer decoding does)."""
    check_exit_layers([exit_layer], model.num_layers)
    return generate_ar(model, prompt_ids, cfg, depth=exit_layer)


# --- speculative decoding: one propose/verify loop, three drafters --------------------------

class VerifyLogits:
    """The full model's logits at each verified position, computed on demand: position 0
    alone, the rest in one batch only if the first draft is accepted. With low acceptance
    most rounds pay for one LM-head row instead of k+1 (on a CPU a k+1-row head costs about
    k+1 times one row). Rows past `final_hidden` (or `known`) come from `last`, which the
    self-speculator uses to run the last draft only when every draft was accepted."""

    def __init__(self, model: EarlyExitModel, final_hidden: torch.Tensor | None,
                 known: list[torch.Tensor] | None = None,
                 last: Callable[[], torch.Tensor] | None = None):
        self.model, self.hidden, self.last = model, final_hidden, last
        self.rows: dict[int, torch.Tensor] = dict(enumerate(known or []))
        self.size = len(self.rows) if final_hidden is None else final_hidden.shape[1]

    def __getitem__(self, i: int) -> torch.Tensor:
        if i not in self.rows:
            if i >= self.size:
                assert self.last is not None and i == self.size
                self.rows[i] = self.last()
                return self.rows[i]
            lo = 0 if i == 0 else 1
            hi = 1 if i == 0 else self.size
            for j, row in enumerate(self.model.logits(self.hidden[:, lo:hi])[0], start=lo):
                self.rows.setdefault(j, row)
        return self.rows[i]


def defer_last_draft(full_rounds: int, rounds: int, exit_layer: int, num_layers: int) -> bool:
    """Whether to leave the last draft out of verification until every draft is accepted.

    The last draft's own pass only yields the bonus token of a fully accepted round. Running
    it with the others costs E sequential one-token layer calls every round; deferring it
    costs L of them in a fully accepted round only. Defer while the (Laplace-smoothed) share
    of fully accepted rounds so far is below E / L."""
    return (full_rounds + 1) / (rounds + 2) * num_layers < exit_layer


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

    def __init__(self, model: EarlyExitModel, cache, exit_layer: int):
        self.model, self.cache, self.exit_layer = model, cache, exit_layer
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

    def verify(self, committed: list[int], drafts: list[int]) -> VerifyLogits:
        """Full-model logits at the pending token and at every draft."""
        m, e = self.model, self.exit_layer
        last = self._ids(drafts[-1] if drafts else committed[-1])

        def full_pass(cached: torch.Tensor | None) -> torch.Tensor:
            """The last draft's shallow pass, then the deep layers over the cached exit
            states (if any) and it."""
            hidden = m.run_layers(m.embed(last), self.cache, 0, e)
            if cached is not None:
                hidden = torch.cat([cached, hidden], dim=1)
            return m.run_layers(hidden, self.cache, e, m.num_layers)

        def deferred_logits() -> torch.Tensor:
            return m.logits(full_pass(None))[0, -1]

        if e == m.num_layers:  # exiting at the last layer is the full model: reuse its logits
            return VerifyLogits(m, None, self.exit_logits, last=deferred_logits)
        cached = torch.cat(self.exit_hidden, dim=1) if self.exit_hidden else None
        if cached is None or not defer_last_draft(self.full_rounds, self.rounds, e,
                                                  m.num_layers):
            return VerifyLogits(m, full_pass(cached))
        deep = m.run_layers(cached, self.cache, e, m.num_layers)
        return VerifyLogits(m, deep, last=deferred_logits)

    def end_round(self, cached_len: int, all_accepted: bool) -> None:
        crop_cache(self.cache, cached_len)
        self.rounds += 1
        self.full_rounds += all_accepted

    def _ids(self, token: int) -> torch.Tensor:
        return torch.tensor([[token]], device=self.model.device)


class DraftModelSpeculator:
    """Classic two-model speculative decoding; the draft model keeps its own cache."""

    def __init__(self, model: EarlyExitModel, cache, draft: EarlyExitModel):
        self.model, self.cache, self.draft_model = model, cache, draft
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

    def verify(self, committed: list[int], drafts: list[int]) -> VerifyLogits:
        """Full-model logits at the pending token and at every draft."""
        m = self.model
        ids = torch.tensor([[committed[-1], *drafts]], device=m.device)
        return VerifyLogits(m, m.run_layers(m.embed(ids), self.cache, 0, m.num_layers))

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
                 max_ngram: int = MAX_NGRAM):
        self.model, self.cache = model, cache
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

    def verify(self, committed: list[int], drafts: list[int]) -> VerifyLogits:
        """Full-model logits at the pending token and at every draft."""
        m = self.model
        ids = torch.tensor([[committed[-1], *drafts]], device=m.device)
        return VerifyLogits(m, m.run_layers(m.embed(ids), self.cache, 0, m.num_layers))

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


@torch.inference_mode()
def generate_speculative(model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig, k: int,
                         *, exit_layer: int | None = None, draft: EarlyExitModel | None = None,
                         prompt_lookup: bool = False,
                         on_round: Callable[[object, list[int]], None] | None = None) -> Generation:
    """`layerskip` when exit_layer is given, `spec` when a draft model is given, `pld` with
    prompt_lookup. `draft_s` sums the time spent proposing: every drafter hands back its
    tokens as Python ints, so the device has finished the draft work when the timer reads."""
    if k < 1:
        raise LsbenchError(f"number of speculations must be >= 1, got {k}")
    sampler = Sampler(cfg, model.device)
    cache = model.new_cache()
    if draft is not None:
        check_draft_vocabulary(model, draft)
        speculator = DraftModelSpeculator(model, cache, draft)
    elif prompt_lookup:
        speculator = PromptLookupSpeculator(model, cache, cfg.stop_token_ids)
    else:
        check_exit_layers([exit_layer], model.num_layers)
        speculator = SelfSpeculator(model, cache, exit_layer)
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
    while len(out) < cfg.max_new_tokens and out[-1] not in cfg.stop_token_ids:
        budget = min(k, cfg.max_new_tokens - len(out) - 1)  # never draft past max_new_tokens
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
        if on_round is not None:
            on_round(cache, committed)
    sync(model.device)
    t2 = time.perf_counter()
    return Generation(
        out, t1 - t0, t2 - t1, len(out) - 1, drafted, accepted,
        prefill_counts=c1.minus(c0), decode_counts=model.counts.minus(c1),
        draft_prefill_counts=d1.minus(d0) if d0 else None,
        draft_decode_counts=drafter_counts.minus(d1) if d1 else None, draft_s=draft_s,
        # Buffers only grow (a rollback is a view), so the end is the peak.
        kv_cache_bytes=cache_bytes(cache, getattr(speculator, "draft_cache", None)),
    )


def generate(strategy: str, model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig, *,
             k: int = 4, exit_layer: int | None = None,
             draft: EarlyExitModel | None = None) -> Generation:
    """Run one strategy by name."""
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
