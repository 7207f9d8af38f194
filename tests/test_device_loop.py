"""The CUDA decoding path, exercised on CPU tensors: greedy rounds with one device-to-host
transfer, the verify head's shape and the deferral chosen by measured costs, both exact."""

from __future__ import annotations

import itertools

import pytest
import torch

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.policy import EnginePolicy, defer_last_draft
from lsbench.engine.strategies import generate, generate_speculative
from lsbench.scenario.costs import CostTable, UnitCosts, calibrate
from lsbench.scenario.replay import replay
from lsbench.scenario.scan import exit_traces
from tests.conftest import tiny_model

PROMPT = [1, 5, 9, 17, 33, 4, 60, 12]
GREEDY = DecodingConfig(max_new_tokens=24)
# Flat head (eager), a deferral break-even of 0 (never defer): the one-transfer round.
FLAT = EnginePolicy(4, layer_1=0.0, layer_k=1.0, layer_k1=1.0, head_1=1.0, head_k1=1.0)
# Linear head (lazy) and a measured break-even unlike E/L (0.5 at every E).
LINEAR = EnginePolicy(4, layer_1=1.0, layer_k=1.0, layer_k1=1.0, head_1=2.0, head_k1=10.0)
POLICIES = [None, FLAT, LINEAR]


@pytest.fixture(scope="module")
def ar_tokens(target) -> list[int]:
    return generate("ar", target, PROMPT, GREEDY).tokens


@pytest.fixture(scope="module")
def small_draft() -> EarlyExitModel:
    return EarlyExitModel(tiny_model(seed=7, num_layers=2))


def _run(model, cfg, k, policy, device_loop, **kw):
    return generate_speculative(model, PROMPT, cfg, k, policy=policy, device_loop=device_loop,
                                **kw)


@pytest.mark.parametrize("policy", POLICIES, ids=["default", "eager", "lazy"])
def test_device_loop_does_the_host_loops_work_and_equals_ar(target, ar_tokens, small_draft,
                                                            policy):
    kinds = [{"exit_layer": e} for e in range(1, target.num_layers + 1)]
    kinds += [{"draft": small_draft}, {"prompt_lookup": True}]
    for kw, k in itertools.product(kinds, (1, 3, 8)):
        host = _run(target, GREEDY, k, policy, False, **kw)
        dev = _run(target, GREEDY, k, policy, True, **kw)
        assert host.tokens == dev.tokens == ar_tokens, (kw, k)
        assert (host.drafted, host.accepted) == (dev.drafted, dev.accepted)
        assert host.decode_counts == dev.decode_counts  # no stop token: the very same work
        assert dev.device_loop and not host.device_loop
        assert dev.eager_head == (policy is not None and policy.eager_head)


def test_device_loop_with_stop_tokens_keeps_the_rounds(target, ar_tokens, small_draft):
    cut = False
    for stop_at in (3, 5, 11):
        stop = ar_tokens[stop_at]
        cfg = DecodingConfig(max_new_tokens=24, stop_token_ids=(stop,))
        expected = ar_tokens[: ar_tokens.index(stop) + 1]
        kinds = [{"exit_layer": e} for e in range(1, target.num_layers + 1)]
        kinds += [{"draft": small_draft}, {"prompt_lookup": True}]
        for kw, k, policy in itertools.product(kinds, (1, 3, 8), POLICIES):
            host = _run(target, cfg, k, policy, False, **kw)
            dev = _run(target, cfg, k, policy, True, **kw)
            assert host.tokens == dev.tokens == expected
            assert (host.drafted, host.accepted) == (dev.drafted, dev.accepted)
            # Drafts after a drafted stop token are the only extra work, and they are counted.
            extra = [d - h for d, h in zip(dev.decode_counts.layer_tokens,
                                           host.decode_counts.layer_tokens, strict=True)]
            assert all(x >= 0 for x in extra)
            cut |= any(extra)
    assert cut  # some round drafted past a stop token, and the cut kept the rounds


def _count_transfers(monkeypatch) -> list[int]:
    """Counts device-to-host conversions of tensors (each a sync on CUDA)."""
    calls = [0]
    for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "cpu",
                 "numpy"):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, **kwargs):
            calls[0] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return calls


@pytest.mark.parametrize("kind", ["layerskip", "layerskip-last", "spec", "pld"])
def test_greedy_device_round_makes_one_transfer(target, small_draft, monkeypatch, kind):
    kw = {"layerskip": {"exit_layer": 2}, "layerskip-last": {"exit_layer": target.num_layers},
          "spec": {"draft": small_draft}, "pld": {"prompt_lookup": True}}[kind]
    calls = _count_transfers(monkeypatch)
    per_round: list[int] = []
    gen = _run(target, GREEDY, 3, FLAT, True,
               on_round=lambda cache, committed: per_round.append(calls[0]), **kw)
    monkeypatch.undo()
    assert len(per_round) == len(gen.drafted) > 2
    prefill = 1  # the first token's argmax, before any round
    rounds = [per_round[0] - prefill] + [b - a for a, b in itertools.pairwise(per_round)]
    if kind == "layerskip-last":  # E = L defers the bonus pass to a fully accepted round
        assert rounds == [1 + (a == d) for d, a in zip(gen.drafted, gen.accepted, strict=True)]
    else:
        assert rounds == [1] * len(gen.drafted)
    if kind != "pld":  # the host loop converts every drafted token, and each verdict
        calls = _count_transfers(monkeypatch)
        host = _run(target, GREEDY, 3, FLAT, False, **kw)
        assert calls[0] >= 1 + len(host.drafted) + sum(host.drafted)


def test_lazy_head_and_deferral_transfer_only_when_they_skip_work(target, monkeypatch):
    calls = _count_transfers(monkeypatch)
    per_round: list[int] = [1]
    gen = _run(target, GREEDY, 3, None, True, exit_layer=3,
               on_round=lambda cache, committed: per_round.append(calls[0]))
    monkeypatch.undo()
    rounds = [b - a for a, b in itertools.pairwise(per_round)]
    full = 0
    for i, (d, a, n) in enumerate(zip(gen.drafted, gen.accepted, rounds, strict=True)):
        deferred = d > 0 and defer_last_draft(full, i, 3, target.num_layers)
        assert n == 1 + (a >= 1 and (d >= 2 or not deferred)) + (deferred and a == d)
        full += d > 0 and a == d


def test_calibration_picks_eager_for_a_flat_head_and_lazy_for_a_linear_one():
    model = EarlyExitModel(tiny_model(seed=0, num_layers=4))
    flat = UnitCosts(layer_1=1.0, layer_k=1.1, layer_k1=1.1, head_1=2.0, head_k1=2.4)
    linear = UnitCosts(layer_1=1.0, layer_k=3.0, layer_k1=3.5, head_1=2.0, head_k1=10.0)
    seen = []

    def fake(costs):
        def measure(m, prompt, k):
            seen.append((len(prompt), k))
            return costs
        return measure

    counts = model.counts.copy()
    assert calibrate(model, 4, [5, 6], measure=fake(flat)).eager_head
    assert calibrate(model, 4, [5, 6], measure=fake(linear)).eager_head  # cached per k
    assert not calibrate(model, 3, [5, 6], measure=fake(linear)).eager_head
    assert seen == [(5, 4), (4, 3)]  # prompt padded to k+1 tokens, measured once per k
    assert model.counts == counts
    # The deferral break-even follows the measured costs: E one-token layers (plus one more
    # deep token per layer) every round against an L-layer pass and a head row.
    flat_policy = model.engine_policies[4]
    assert flat_policy.defer_threshold(1, 4) == pytest.approx(1.0 / 6.0)
    linear_policy = model.engine_policies[3]
    assert linear_policy.defer_threshold(1, 4) == pytest.approx((1.0 + 3 * 0.5) / 6.0)
    # The model's calibration is what generate_speculative runs with.
    gen = generate_speculative(model, PROMPT, GREEDY, 4, exit_layer=1)
    assert gen.eager_head and gen.defer_threshold == flat_policy.defer_threshold(1, 4)
    assert gen.tokens == generate("ar", model, PROMPT, GREEDY).tokens
    plain = generate_speculative(model, PROMPT, GREEDY, 2, exit_layer=1)
    assert not plain.eager_head and plain.defer_threshold is None


def test_calibration_measures_real_costs(target):
    model = EarlyExitModel(tiny_model(seed=0, num_layers=2))
    policy = calibrate(model, 2, [3, 4, 5])
    assert policy.head_1 > 0 and policy.layer_1 > 0 and policy.k == 2


@pytest.mark.parametrize("policy", [FLAT, LINEAR], ids=["eager", "lazy"])
@pytest.mark.parametrize("device_loop", [False, True])
def test_replay_and_cost_model_follow_the_policy(target, policy, device_loop):
    """The scan reproduces a calibrated run: its deferrals (with the run's break-even) and,
    with the run's head shape, its layer and head work."""
    out = generate("ar", target, PROMPT, GREEDY).tokens
    traces = exit_traces(target, PROMPT, out)
    L = target.num_layers
    for e, k in itertools.product(range(1, L + 1), (1, 3, 6)):
        gen = _run(target, GREEDY, k, policy, device_loop, exit_layer=e)
        rep = replay(out, traces[e - 1].argmax.tolist(), k, 24, exit_layer=e, num_layers=L,
                     defer_threshold=gen.defer_threshold)
        assert gen.accepted == [r.accepted for r in rep.rounds]
        heads = CostTable(L, (0.0,) * (k + 1), 0.0, tuple(float(n) for n in range(1, k + 2)),
                          eager_head=gen.eager_head)
        tokens = CostTable(L, tuple(float(n) for n in range(1, k + 2)), 0.0, (0.0,) * (k + 1))
        assert heads.decode_seconds(rep, "layerskip", e) == gen.decode_counts.head_tokens
        assert tokens.decode_seconds(rep, "layerskip", e) == sum(gen.decode_counts.layer_tokens)


def test_runner_calibrates_during_warm_up_off_the_cpu_only(tiny_model_dir, tmp_path,
                                                           monkeypatch):
    import lsbench.scenario.runner
    from lsbench.scenario.jobs import sweep_job
    from tests.test_runner import job_settings, write_jsonl

    data = write_jsonl(tmp_path / "articles.jsonl")
    job = sweep_job(job_settings(tiny_model_dir, data, data__limit=1, sweep__exit_layers="1,2",
                                 sweep__num_speculations="3,2", sweep__warmup=1), 4)
    prepared = lsbench.scenario.runner.prepare_job(job)
    seen, generated = [], []
    runner = lsbench.scenario.runner
    monkeypatch.setattr(runner, "calibrate", lambda model, k, prompt: seen.append(k))
    monkeypatch.setattr(runner, "_generate", lambda *args: generated.append(seen[:]))
    lsbench.scenario.runner.warm_up(prepared, job.runs)
    assert seen == [] and generated  # CPU: the default policy
    monkeypatch.setattr(prepared.loaded.adapter, "device", torch.device("meta"))
    generated.clear()
    lsbench.scenario.runner.warm_up(prepared, job.runs)
    assert seen == [2, 3] and all(g == [2, 3] for g in generated)  # before any generation
