"""`lsbench scan` is exact: replaying rounds over one teacher-forced pass reproduces real
greedy speculative runs round for round, and the priced schedule is the engine's own work."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.prompt_lookup import lookup_drafts
from lsbench.engine.strategies import generate, generate_speculative
from lsbench.scenario.costs import CostTable, no_bonus
from lsbench.scenario.replay import Round, replay
from lsbench.scenario.scan import draft_trace, exit_traces
from tests.conftest import tiny_model

PROMPTS = [[1, 5, 9, 17, 33, 4, 60, 12], [1, 70, 71, 72, 3, 8]]


@pytest.fixture(scope="module")
def deep() -> EarlyExitModel:
    return EarlyExitModel(tiny_model(seed=3, num_layers=6))


@pytest.fixture(scope="module")
def small_draft() -> EarlyExitModel:
    return EarlyExitModel(tiny_model(seed=7, num_layers=2))


def _trace(model, prompt, cfg):
    out = generate("ar", model, prompt, cfg).tokens
    return out, exit_traces(model, prompt, out)


def _check_same_rounds(gen, rep, k):
    assert gen.accepted == [r.accepted for r in rep.rounds]
    assert len(gen.drafted) == len(rep.rounds)
    assert gen.decode_tokens == rep.decode_tokens
    hist = [0] * (k + 1)
    for a in gen.accepted:
        hist[a] += 1
    assert hist == rep.accept_hist


def _counting(num_layers: int, kmax: int, *, layer=None, head=None, call=0.0) -> CostTable:
    """Unit 'costs' that count work instead of seconds."""
    return CostTable(num_layers, tuple(layer or [0.0] * (kmax + 1)), call,
                     tuple(head or [0.0] * (kmax + 1)), draft_forward=(0.0, 0.0))


def _check_schedule(model, gen, rep, e, k):
    """The priced schedule does exactly the engine's layer-token, call and head work."""
    L = model.num_layers
    tokens = _counting(L, k, layer=[float(n) for n in range(1, k + 2)])
    calls = _counting(L, k, layer=[1.0] * (k + 1))
    heads = _counting(L, k, head=[float(n) for n in range(1, k + 2)])
    assert tokens.decode_seconds(rep, "layerskip", e) == sum(gen.decode_counts.layer_tokens)
    assert calls.decode_seconds(rep, "layerskip", e) == sum(gen.decode_counts.layer_calls)
    assert heads.decode_seconds(rep, "layerskip", e) == gen.decode_counts.head_tokens
    steps = _counting(L, k).with_overheads(step=1.0)  # loop work per token fed = embeddings
    assert steps.decode_seconds(rep, "layerskip", e) == gen.decode_counts.embed_tokens


@pytest.mark.parametrize("max_new", [24, 13, 5, 2, 1])
def test_replay_equals_layerskip_runs_for_every_exit_and_k(deep, max_new):
    cfg = DecodingConfig(max_new_tokens=max_new)
    for prompt in PROMPTS:
        out, traces = _trace(deep, prompt, cfg)
        assert [int(t) for t in traces[-1].argmax[:-1]] == out[1:]  # full model = x
        for e, k in itertools.product(range(1, deep.num_layers + 1), range(1, 9)):
            gen = generate_speculative(deep, prompt, cfg, k, exit_layer=e)
            assert gen.tokens == out
            rep = replay(out, traces[e - 1].argmax.tolist(), k, max_new, exit_layer=e,
                         num_layers=deep.num_layers)
            _check_same_rounds(gen, rep, k)
            assert gen.drafted == [r.drafted for r in rep.rounds]  # no stop token: exact
            _check_schedule(deep, gen, rep, e, k)


def test_replay_equals_spec_runs_with_a_draft_model(target, small_draft):
    cfg = DecodingConfig(max_new_tokens=20)
    for prompt in PROMPTS:
        out = generate("ar", target, prompt, cfg).tokens
        trace = draft_trace(small_draft, prompt, out)
        for k in range(1, 9):
            gen = generate_speculative(target, prompt, cfg, k, draft=small_draft)
            rep = replay(out, trace.argmax.tolist(), k, cfg.max_new_tokens)
            _check_same_rounds(gen, rep, k)
            assert gen.drafted == [r.drafted for r in rep.rounds]
            assert sum(gen.accepted) < sum(gen.drafted)  # an unrelated draft is rejected
            L, Ld = target.num_layers, small_draft.num_layers
            work = CostTable(L, tuple(float(n) for n in range(1, k + 2)), 0.0, (0.0,) * (k + 1),
                             draft_forward=(float(Ld), 2.0 * Ld))
            assert work.decode_seconds(rep, "spec") == (
                sum(gen.decode_counts.layer_tokens) + sum(gen.draft_decode_counts.layer_tokens))


def _stop_cases(model, cfg_tokens=24):
    """(prompt, stop token, expected output) whose stop token ends the output mid-budget."""
    cases = []
    for prompt in PROMPTS:
        out = generate("ar", model, prompt, DecodingConfig(max_new_tokens=cfg_tokens)).tokens
        for pos in (3, 7, 11):
            stop = out[pos]
            cases.append((prompt, stop, out[: out.index(stop) + 1]))
    return cases


def test_replay_equals_layerskip_runs_with_stop_tokens_outside_drafts(deep):
    """Stop tokens the exits never propose: the rounds must match to the last count."""
    checked = 0
    for prompt, stop, expected in _stop_cases(deep):
        cfg = DecodingConfig(max_new_tokens=24, stop_token_ids=(stop,))
        out, traces = _trace(deep, prompt, cfg)
        assert out == expected
        for e, k in itertools.product(range(1, deep.num_layers), (1, 2, 4, 8)):
            drafts = traces[e - 1].argmax.tolist()
            if stop in drafts[: len(out) - 1]:
                continue  # the stop token inside drafts: the next test
            gen = generate_speculative(deep, prompt, cfg, k, exit_layer=e)
            rep = replay(out, drafts, k, 24, (stop,), exit_layer=e, num_layers=deep.num_layers)
            _check_same_rounds(gen, rep, k)
            checked += 1
    assert checked > 20


def test_replay_equals_layerskip_runs_with_stop_tokens_inside_drafts(deep):
    checked = priced = stop_ended = 0
    for prompt, stop, _ in _stop_cases(deep):
        cfg = DecodingConfig(max_new_tokens=24, stop_token_ids=(stop,))
        out, traces = _trace(deep, prompt, cfg)
        for e, k in itertools.product(range(1, deep.num_layers + 1), (1, 2, 4, 8)):
            drafts = traces[e - 1].argmax.tolist()
            if stop not in drafts[: len(out) - 1]:
                continue
            gen = generate_speculative(deep, prompt, cfg, k, exit_layer=e)
            rep = replay(out, drafts, k, 24, (stop,), exit_layer=e, num_layers=deep.num_layers)
            _check_same_rounds(gen, rep, k)
            _check_drafted_explained(gen.drafted, rep, stop, None)
            checked += 1
            if gen.drafted == [r.drafted for r in rep.rounds]:  # no stop token off the path
                _check_schedule(deep, gen, rep, e, k)  # no bonus work after an accepted stop
                priced += 1
                stop_ended += any(no_bonus(r) for r in rep.rounds)
    assert checked > 5 and priced > 5 and stop_ended > 2


def test_a_round_ending_on_an_accepted_stop_draft_prices_no_bonus_token():
    """`strategies.accept` computes no bonus token when every draft is accepted and the last
    is a stop token: no head row for it (lazy head, one draft), no deferred bonus pass."""
    L, k = 4, 3
    heads = _counting(L, k, head=[float(n) for n in range(1, k + 2)])
    tokens = _counting(L, k, layer=[float(n) for n in range(1, k + 2)])
    stop1, more1 = Round(1, 1, 1, False, 0, False), Round(1, 1, 2, False, 0, False)
    assert no_bonus(stop1) and not no_bonus(more1)
    assert not no_bonus(Round(2, 1, 2, False, 0, False))  # a rejection: a correction token
    # Draft model, prompt lookup: verify row 0 only; eager heads compute both rows anyway.
    assert (heads.spec_round(stop1), heads.spec_round(more1)) == (1, 2)
    assert (heads.pld_round(stop1), heads.pld_round(more1)) == (1, 2)
    eager = dataclasses.replace(heads, eager_head=True)
    assert eager.spec_round(stop1) == eager.spec_round(more1) == 2
    # layerskip, E = 2, not deferred: one draft head, then verify row 0 only.
    assert (heads.layerskip_round(stop1, 2), heads.layerskip_round(more1, 2)) == (2, 3)
    # Deferred, two drafts accepted: no last shallow + deep pass (L layer tokens, one row).
    stop2, more2 = Round(2, 2, 2, True, 0, False), Round(2, 2, 3, True, 0, False)
    assert (tokens.layerskip_round(stop2, 2), tokens.layerskip_round(more2, 2)) == (8, 8 + L)
    assert (heads.layerskip_round(stop2, 2), heads.layerskip_round(more2, 2)) == (4, 5)
    # E = L: the drafts were the full model's; no extra full pass for a bonus token.
    assert (tokens.layerskip_round(stop2, L), tokens.layerskip_round(more2, L)) == (8, 12)


def test_spec_runs_ending_on_an_accepted_stop_draft_are_priced_as_run(deep):
    """A draft model with the target's weights: every draft is accepted, and with k = 1 a
    stop token at an odd position is a round's only draft."""
    twin = EarlyExitModel(tiny_model(seed=3, num_layers=6))
    L, stop_ended = deep.num_layers, 0
    for prompt, stop, _ in _stop_cases(deep):
        cfg = DecodingConfig(max_new_tokens=24, stop_token_ids=(stop,))
        out = generate("ar", deep, prompt, cfg).tokens
        trace = draft_trace(twin, prompt, out)
        for k in (1, 2, 3):
            gen = generate_speculative(deep, prompt, cfg, k, draft=twin)
            assert gen.tokens == out
            rep = replay(out, trace.argmax.tolist(), k, cfg.max_new_tokens, (stop,))
            _check_same_rounds(gen, rep, k)
            assert gen.drafted == [r.drafted for r in rep.rounds]
            heads = _counting(L, k, head=[float(n) for n in range(1, k + 2)])
            tokens = _counting(L, k, layer=[float(n) for n in range(1, k + 2)])
            assert heads.decode_seconds(rep, "spec") == gen.decode_counts.head_tokens
            assert tokens.decode_seconds(rep, "spec") == sum(gen.decode_counts.layer_tokens)
            stop_ended += any(no_bonus(r) and r.drafted == 1 for r in rep.rounds)
    assert stop_ended > 0


def _check_drafted_explained(real_drafted, rep, stop, _):
    """Drafted counts equal the replay's, except where drafts made after a rejected one (on a
    prefix the trace lacks) were cut short by the engine."""
    for real, r in zip(real_drafted, rep.rounds, strict=True):
        if real != r.drafted:
            assert r.offpath > 0 and r.drafted - r.offpath <= real < r.drafted


# --- the confidence-stopped drafter, against a brute-force reference ---------------------------

def _logits(model: EarlyExitModel, ids: list[int], layers: int) -> torch.Tensor:
    """Recompute from scratch: no cache sharing, no shortcut."""
    cache = model.new_cache()
    hidden = model.run_layers(model.embed(torch.tensor([ids])), cache, 0, layers)
    return model.logits(hidden[:, -1:])[0, -1]


@torch.inference_mode()
def brute_force(model, prompt, max_new, k, e, stops=(), threshold=None):
    """Greedy speculative decoding with confidence-stopped drafts, from first principles."""
    L = model.num_layers
    out = [int(_logits(model, prompt, L).argmax())]
    drafted, accepted = [], []
    while len(out) < max_new and out[-1] not in stops:
        budget = min(k, max_new - len(out) - 1)
        drafts = []
        for _ in range(budget):
            logits = _logits(model, prompt + out + drafts, e)
            p = logits.softmax(-1)
            if threshold is not None and float(p.max()) < threshold:
                break
            drafts.append(int(logits.argmax()))
            if drafts[-1] in stops:
                break
        n_ok = 0
        while n_ok < len(drafts) and drafts[n_ok] == int(
                _logits(model, prompt + out + drafts[:n_ok], L).argmax()):
            n_ok += 1
        bonus = int(_logits(model, prompt + out + drafts[:n_ok], L).argmax())
        new = [*drafts[:n_ok], bonus]
        for j, t in enumerate(new):
            if t in stops:
                new = new[: j + 1]
                break
        out += new
        drafted.append(len(drafts))
        accepted.append(n_ok)
    return out, drafted, accepted


@pytest.mark.parametrize("threshold", [None, 0.15, 0.3, 0.6])
def test_confidence_stopped_replay_equals_brute_force(target, threshold):
    for prompt, stop in ((PROMPTS[0], ()), (PROMPTS[1], None)):
        cfg = DecodingConfig(max_new_tokens=14)
        out, traces = _trace(target, prompt, cfg)
        stops = (out[6],) if stop is None else ()
        out = out[: out.index(stops[0]) + 1] if stops else out
        for e, k in itertools.product((1, 2, 3), (1, 3, 5)):
            ref_out, drafted, accepted = brute_force(target, prompt, 14, k, e, stops, threshold)
            assert ref_out == out
            t = traces[e - 1]
            rep = replay(out, t.argmax.tolist(), k, 14, stops, exit_layer=e,
                         num_layers=target.num_layers, probs=t.prob.tolist(),
                         threshold=threshold)
            assert accepted == [r.accepted for r in rep.rounds]
            _check_drafted_explained(drafted, rep, stops, threshold)


def test_confidence_threshold_changes_the_rounds(target):
    cfg = DecodingConfig(max_new_tokens=24)
    out, traces = _trace(target, PROMPTS[0], cfg)
    t = traces[0]
    plain = replay(out, t.argmax.tolist(), 4, 24, exit_layer=1, num_layers=4)
    strict = replay(out, t.argmax.tolist(), 4, 24, exit_layer=1, num_layers=4,
                    probs=t.prob.tolist(), threshold=1.0)
    assert strict.drafted == 0 < plain.drafted  # nothing is ever that sure: no drafts at all
    assert len(strict.rounds) == len(out) - 1
    assert all(r.conf_stopped for r in strict.rounds[:-1])  # the last has no budget


PLD_PROMPTS = [[1, 5, 9, 17, 5, 9, 33, 4, 60, 12, 4, 60], [1, 70, 71, 72, 3, 70, 71, 8],
               [65, 18, 37, 18, 13, 80, 33, 69, 78, 19, 40, 13]]


def _pld_cases(model):
    """(prompt, cfg) with budget cuts and stop tokens inside and at the end of the output."""
    cases = []
    prompts = list(PLD_PROMPTS)
    for prompt in PLD_PROMPTS:  # the prompt, its output's start and the prompt again
        out = generate("ar", model, prompt, DecodingConfig(max_new_tokens=24)).tokens
        prompts.append([*prompt, *out[:6], 7, *prompt])
    for prompt in prompts:
        for max_new in (24, 9, 2, 1):
            cases.append((prompt, DecodingConfig(max_new_tokens=max_new)))
        out = generate("ar", model, prompt, DecodingConfig(max_new_tokens=24)).tokens
        for pos in (4, 10, 17):
            cases.append((prompt, DecodingConfig(max_new_tokens=24,
                                                 stop_token_ids=(out[pos],))))
        # a stop token that the matcher proposes alone and that ends the output
        for pos in range(1, len(out)):
            if (out[pos] not in out[:pos]
                    and lookup_drafts([*prompt, *out[:pos]], 1) == [out[pos]]):
                cases.append((prompt, DecodingConfig(max_new_tokens=24,
                                                     stop_token_ids=(out[pos],))))
    return cases


def test_pld_replay_equals_pld_runs(deep):
    """Prompt lookup needs no trace: drafted and accepted counts, rounds, the histogram and
    the rounds without a draft are exact, and the priced round is the engine's work."""
    from lsbench.scenario.replay import replay_pld

    L = deep.num_layers
    accepted_any = no_draft_rounds = stop_drafted = 0
    for prompt, cfg in _pld_cases(deep):
        out = generate("ar", deep, prompt, cfg).tokens
        for k in range(1, 7):
            gen = generate_speculative(deep, prompt, cfg, k, prompt_lookup=True)
            assert gen.tokens == out
            rep = replay_pld(prompt, out, k, cfg.max_new_tokens, cfg.stop_token_ids)
            _check_same_rounds(gen, rep, k)
            assert gen.drafted == [r.drafted for r in rep.rounds]
            assert sum(1 for d in gen.drafted if d == 0) == sum(
                1 for r in rep.rounds if r.drafted == 0)
            accepted_any += sum(gen.accepted)
            no_draft_rounds += sum(1 for d in gen.drafted if d == 0)
            stop_drafted += any(r.drafted == r.accepted == 1 and r.emitted == 1
                                for r in rep.rounds)
            tokens = _counting(L, k, layer=[float(n) for n in range(1, k + 2)])
            calls = _counting(L, k, layer=[1.0] * (k + 1))
            heads = _counting(L, k, head=[float(n) for n in range(1, k + 2)])
            assert tokens.decode_seconds(rep, "pld") == sum(gen.decode_counts.layer_tokens)
            assert calls.decode_seconds(rep, "pld") == sum(gen.decode_counts.layer_calls)
            assert heads.decode_seconds(rep, "pld") == gen.decode_counts.head_tokens
    # the cases exercise matches, misses and a single accepted stop-token draft
    assert accepted_any > 0 and no_draft_rounds > 0 and stop_drafted > 0


def test_scan_rows_include_pld_unless_turned_off(deep):
    from lsbench.scenario.scan import Point, predict_rows, scan_points

    prompt, cfg = PLD_PROMPTS[0], DecodingConfig(max_new_tokens=16)
    out, traces = _trace(deep, prompt, cfg)
    costs = CostTable(deep.num_layers, (1e-3,) * 5, 1e-4, (1e-3,) * 5)
    rows = predict_rows([Point("pld", 3), Point("layerskip", 3, 2)], out, traces, {}, cfg,
                        costs, 5.0, prompt_ids=prompt)
    gen = generate_speculative(deep, prompt, cfg, 3, prompt_lookup=True)
    assert rows[0]["strategy"] == "pld" and rows[0]["exit_layer"] == 0
    assert rows[0]["predicted_accepted_per_round"] == gen.accepted
    assert rows[0]["predicted_drafted_per_round"] == gen.drafted
    assert rows[0]["predicted_speedup"] > 0

    class _Spec:  # the fields scan_points reads
        ks, exit_layers, thresholds, drafts = (1, 2), (1,), (), ()

    for pld, want in ((True, 4), (False, 2)):
        spec = _Spec()
        spec.pld = pld
        points = scan_points(spec)
        assert len(points) == want
        assert sum(p.strategy == "pld" for p in points) == (2 if pld else 0)
