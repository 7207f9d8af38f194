"""Replay of greedy speculative rounds over a teacher-forced trace: no model, no torch.

Greedy speculative output equals the autoregressive output `out`, and while its drafts are
right a drafter sees exactly the true prefix. So the draft proposed from pending position j
(the index into `out` of the token fed in) is the drafter's argmax `drafts[j]` of a
teacher-forced pass over prompt + out, and it is accepted iff it equals out[j + 1]. Replaying
lsbench's round rules over these sequences gives every round's accepted count exactly:

- a round whose pending token is out[p] drafts up to min(k, max_new_tokens - len(out) - 1)
  tokens, and stops right after a drafted stop token (it is the last draft);
- greedy acceptance keeps the longest prefix of drafts equal to out, plus the full model's token;
  emitted tokens are cut after the first stop token;
- rounds end when max_new_tokens is reached or the last emitted token is a stop token.

Prompt lookup (`replay_pld`) needs no trace: its drafts are a function of the committed text
prompt + out[:emitted], so every round, drafted count included, is replayed exactly.

Drafts after a rejected one are computed on a wrong prefix that the trace does not hold. The
replay assumes they run to the round's budget (neither a stop token nor, for the confidence
policy, a low-confidence token cuts them) and counts them in `offpath`, so a reader can see
exactly which drafted counts rest on that assumption; accepted counts, rounds, histograms and
the deferral decisions never do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lsbench.engine.policy import defer_last_draft  # the engine's own rule (torch-free)
from lsbench.engine.prompt_lookup import MAX_NGRAM, lookup_drafts


@dataclass(frozen=True)
class Round:
    """One replayed verification round."""

    drafted: int  # drafts verified
    accepted: int  # leading drafts equal to the full model's tokens
    emitted: int  # tokens the round appended to the output (after the stop-token cut)
    deferred: bool  # layerskip: last draft left out of verification until all are accepted
    offpath: int  # drafts computed after a rejected draft (on a prefix the trace lacks)
    conf_stopped: bool  # confidence policy: one more shallow step ran and its draft was dropped
    first_fed: int = 1  # draft model: tokens its first step feeds (2 after a fully accepted round)


@dataclass(frozen=True)
class Replay:
    rounds: tuple[Round, ...]
    k: int
    decode_tokens: int  # tokens emitted after the first
    compared: tuple[int, ...] = field(default=())  # positions j whose on-path draft was judged

    @property
    def drafted(self) -> int:
        return sum(r.drafted for r in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.rounds)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_accepted_len(self) -> float:
        return self.decode_tokens / len(self.rounds) if self.rounds else float("nan")

    @property
    def accept_hist(self) -> list[int]:
        """Rounds with i accepted drafts, i = 0..k (the results file's accept_hist)."""
        hist = [0] * (self.k + 1)
        for r in self.rounds:
            hist[r.accepted] += 1
        return hist

    @property
    def offpath(self) -> int:
        return sum(r.offpath for r in self.rounds)


def replay(out: Sequence[int], drafts: Sequence[int], k: int, max_new_tokens: int,
           stop_token_ids: Sequence[int] = (), *, exit_layer: int | None = None,
           num_layers: int | None = None, probs: Sequence[float] | None = None,
           threshold: float | None = None, defer_threshold: float | None = None) -> Replay:
    """Replay greedy speculative decoding of `out` (the greedy autoregressive output).

    drafts[j]: the drafter's greedy token proposed after out[j] on the true prefix (needed for
    j = 0..len(out) - 2). exit_layer/num_layers: layerskip's deferral policy is replayed
    (without them, a draft model: nothing is deferred). probs/threshold: the confidence-stopped
    drafter, which drops the first draft whose top-1 probability is below the threshold and
    stops drafting there. defer_threshold: the deferral break-even the engine ran with
    (`Generation.defer_threshold`, set by a calibration); None is the E/L rule."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    stops = set(stop_token_ids)
    n = len(out)
    rounds: list[Round] = []
    compared: list[int] = []
    full_rounds, emitted = 0, 1
    prev_full = False
    while emitted < max_new_tokens and out[emitted - 1] not in stops:
        pos = emitted - 1
        budget = min(k, max_new_tokens - emitted - 1)
        drafted = accepted = offpath = 0
        on_path, conf_stopped = True, False
        for i in range(budget):
            j = pos + i
            if not on_path:
                drafted += 1
                offpath += 1
                continue
            if threshold is not None and probs is not None and probs[j] < threshold:
                conf_stopped = True
                break
            drafted += 1
            compared.append(j)
            token = drafts[j]
            if j + 1 < n and token == out[j + 1]:
                accepted += 1
            else:
                on_path = False
            if token in stops:
                break
        deferred = False
        if exit_layer is not None and num_layers is not None and drafted > 0:
            deferred = (exit_layer == num_layers
                        or (not conf_stopped
                            and defer_last_draft(full_rounds, len(rounds), exit_layer,
                                                 num_layers, defer_threshold)))
        full = drafted > 0 and accepted == drafted
        new = min(accepted + 1, n - emitted)  # the stop-token cut: out ends at its stop token
        rounds.append(Round(drafted, accepted, new, deferred, offpath, conf_stopped,
                            first_fed=2 if prev_full else 1))
        full_rounds += full
        prev_full = full
        emitted += new
    return Replay(tuple(rounds), k, emitted - 1, tuple(compared))


def replay_pld(prompt: Sequence[int], out: Sequence[int], k: int, max_new_tokens: int,
               stop_token_ids: Sequence[int] = (), *, max_ngram: int = MAX_NGRAM) -> Replay:
    """Replay greedy prompt-lookup decoding (`pld`) of `out`: each round the matcher drafts
    from the committed tokens (prompt + out so far) exactly as the engine does, and greedy
    acceptance keeps the drafts equal to `out`. A round without a match drafts nothing."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    stops = set(stop_token_ids)
    n = len(out)
    committed = [*prompt, *out]
    rounds: list[Round] = []
    compared: list[int] = []
    emitted = 1
    while emitted < max_new_tokens and out[emitted - 1] not in stops:
        budget = min(k, max_new_tokens - emitted - 1)
        drafts = lookup_drafts(committed[: len(prompt) + emitted], budget, max_ngram=max_ngram,
                               stop_token_ids=stops)
        accepted = 0
        for i, token in enumerate(drafts):
            j = emitted - 1 + i
            compared.append(j)  # the full model judged the draft after out[j]
            if j + 1 < n and token == out[j + 1]:
                accepted += 1
            else:
                break
        new = min(accepted + 1, n - emitted)  # the stop-token cut, as in `replay`
        rounds.append(Round(len(drafts), accepted, new, False, 0, False))
        emitted += new
    return Replay(tuple(rounds), k, emitted - 1, tuple(compared))
