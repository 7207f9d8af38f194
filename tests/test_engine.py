"""The decoding engine is exact: every strategy reproduces greedy autoregressive decoding,
sampling preserves the target distribution, and the accounting adds up."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from lsbench.backend.early_exit import EarlyExitModel, check_architecture
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.strategies import defer_last_draft, generate, generate_speculative
from lsbench.errors import LsbenchError
from tests.conftest import (
    assert_sampling_is_seeded_and_not_greedy,
    replay_deferrals,
    tiny_model,
)

PROMPT = [1, 5, 9, 17, 33, 4, 60, 12]
GREEDY = DecodingConfig(max_new_tokens=24)


@pytest.fixture(scope="module")
def ar_tokens(target) -> list[int]:
    return generate("ar", target, PROMPT, GREEDY).tokens


def test_ar_equals_transformers_generate(target, ar_tokens):
    ref = target.model.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert ar_tokens == ref[0, len(PROMPT):].tolist()
    assert len(ar_tokens) == 24
    assert generate("hf-ar", target, PROMPT, GREEDY).tokens == ar_tokens


@pytest.mark.parametrize("k", [1, 3, 8])
def test_layerskip_greedy_equals_ar_at_every_exit_layer(target, ar_tokens, k):
    for exit_layer in range(1, target.num_layers + 1):
        gen = generate("layerskip", target, PROMPT, GREEDY, k=k, exit_layer=exit_layer)
        assert gen.tokens == ar_tokens, f"E={exit_layer} k={k}"


def test_spec_greedy_with_unrelated_draft_equals_ar(target, ar_tokens):
    draft = EarlyExitModel(tiny_model(seed=7, num_layers=2))
    for k in (1, 3, 8):
        gen = generate("spec", target, PROMPT, GREEDY, k=k, draft=draft)
        assert gen.tokens == ar_tokens
        assert sum(gen.accepted) < sum(gen.drafted)  # unrelated: some drafts are rejected


def test_hf_reference_strategies_equal_ar(target, ar_tokens):
    draft = EarlyExitModel(tiny_model(seed=7, num_layers=2))
    assert generate("hf-assisted", target, PROMPT, GREEDY, k=3, draft=draft).tokens == ar_tokens
    assert generate("hf-early-exit", target, PROMPT, GREEDY, k=3, exit_layer=2).tokens == ar_tokens


def test_exit_at_last_layer_accepts_every_draft(target):
    gen = generate("layerskip", target, PROMPT, GREEDY, k=4, exit_layer=target.num_layers)
    assert gen.accepted == gen.drafted
    assert sum(gen.drafted) > 0


@pytest.mark.parametrize("exit_layer,k", [(1, 1), (2, 3), (3, 8), (4, 4)])
def test_accounting_is_consistent(target, exit_layer, k):
    gen = generate("layerskip", target, PROMPT, GREEDY, k=k, exit_layer=exit_layer)
    assert len(gen.tokens) == GREEDY.max_new_tokens
    # Every round emits its accepted drafts plus one token from the full model.
    assert gen.decode_tokens == sum(gen.accepted) + len(gen.accepted) == len(gen.tokens) - 1
    assert all(0 <= a <= d <= k for a, d in zip(gen.accepted, gen.drafted, strict=True))


@pytest.mark.parametrize("strategy,extra", [
    ("ar", {}), ("exit", {"exit_layer": 2}), ("layerskip", {"k": 3, "exit_layer": 2}),
    ("pld", {"k": 3}), ("hf-ar", {}), ("hf-early-exit", {"k": 3, "exit_layer": 2})])
def test_every_decode_step_is_timed_with_the_tokens_it_emitted(target, strategy, extra):
    gen = generate(strategy, target, PROMPT, GREEDY, **extra)
    # The raw steps the latency percentiles come from cover every token after the first.
    assert len(gen.step_end_s) == len(gen.step_tokens) > 0
    # (generate() may hand out a whole first round at once: what follows it is decode)
    assert sum(gen.step_tokens) == gen.decode_tokens
    if not strategy.startswith("hf-"):
        assert gen.decode_tokens == len(gen.tokens) - 1
    assert all(n >= 1 for n in gen.step_tokens)
    assert all(0 < a <= b for a, b in itertools.pairwise(gen.step_end_s))
    assert gen.step_end_s[-1] <= gen.decode_s
    if strategy in ("layerskip", "pld"):  # one step per round, with its accepted drafts
        assert gen.step_tokens == [a + 1 for a in gen.accepted]


def test_stops_at_stop_token(target, ar_tokens):
    stop = ar_tokens[5]
    cfg = DecodingConfig(max_new_tokens=24, stop_token_ids=(stop,))
    expected = ar_tokens[: ar_tokens.index(stop) + 1]
    assert generate("ar", target, PROMPT, cfg).tokens == expected
    for e in (1, 3):
        assert generate("layerskip", target, PROMPT, cfg, k=3, exit_layer=e).tokens == expected


@pytest.mark.parametrize("exit_layer,k", [(1, 3), (2, 1), (3, 5), (4, 2)])
def test_layer_token_counts_match_cost_formula(target, exit_layer, k):
    gen = generate("layerskip", target, PROMPT, GREEDY, k=k, exit_layer=exit_layer)
    L, E = target.num_layers, exit_layer
    deferred = replay_deferrals(gen, E, L)
    rounds = list(zip(gen.drafted, gen.accepted, deferred, strict=True))
    # DESIGN's cost per round with d drafts: d*E (draft) + E (last draft's shallow pass)
    # + (L-E)*(d+1). A deferred last draft that a rejection makes moot costs L less.
    expected = sum(d * E + E + (L - E) * (d + 1) - (L if defer and a < d else 0)
                   for d, a, defer in rounds)
    assert sum(gen.decode_counts.layer_tokens) == expected
    # ...which puts the same tokens through every layer: shallow layers are never recomputed.
    verified = [d + (0 if defer and a < d else 1) for d, a, defer in rounds]
    assert gen.decode_counts.layer_tokens == [sum(verified)] * L
    assert gen.prefill_counts.layer_tokens == [len(PROMPT)] * L
    # LM head: one per draft; verification computes position 0, then the other positions
    # only when the first draft was accepted, and a deferred last position only when all were.
    if E == L:  # exit logits at the last layer are the target's
        heads = [int(a == d) for d, a, _ in rounds]
    else:
        heads = [1 + (d - 1 if a > 0 else 0) + (a == d) if defer else 1 + (d if a > 0 else 0)
                 for d, a, defer in rounds]
    assert gen.decode_counts.head_tokens == sum(gen.drafted) + sum(heads)


@pytest.mark.parametrize("exit_layer", [2, 3])
def test_last_draft_is_deferred_only_while_full_acceptance_is_rare(target, exit_layer):
    gen = generate("layerskip", target, PROMPT, GREEDY, k=3, exit_layer=exit_layer)
    deferred = replay_deferrals(gen, exit_layer, target.num_layers)
    assert not deferred[0] if exit_layer * 2 <= target.num_layers else deferred[0]
    assert any(deferred) and not all(deferred)
    assert defer_last_draft(0, 10, exit_layer=8, num_layers=32)  # nothing fully accepted
    assert not defer_last_draft(5, 10, exit_layer=8, num_layers=32)  # half: 0.46 * 32 > 8
    assert defer_last_draft(30, 30, exit_layer=32, num_layers=32)  # E = L: always


def test_cache_holds_exactly_the_committed_tokens_after_every_round(target):
    checked = []

    def check(cache, committed):
        lengths = {cache.get_seq_length(i) for i in range(target.num_layers)}
        assert lengths == {len(committed) - 1}
        checked.append(len(committed))

    for exit_layer in (1, 2, 4):
        generate_speculative(target, PROMPT, GREEDY, 3, exit_layer=exit_layer, on_round=check)
    assert len(checked) > 10


# --- sampling preserves the target distribution ----------------------------------------------

def _chi_square_p(observed: dict, expected_probs: dict, n: int) -> float:
    """Pearson chi-square goodness of fit; cells expected below 5 are pooled."""
    from scipy.stats import chi2

    cells, pooled_obs, pooled_exp = [], 0.0, 0.0
    for key, p in expected_probs.items():
        if p * n >= 5:
            cells.append((observed.get(key, 0), p * n))
        else:
            pooled_obs += observed.get(key, 0)
            pooled_exp += p * n
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return float(chi2.sf(stat, len(cells) - 1))


def _exact_joint(model: EarlyExitModel, prompt: list[int], cfg: DecodingConfig, depth: int):
    """P(t1..t_depth | prompt) under the (warped) target distribution, by enumeration."""
    from lsbench.engine.strategies import Sampler

    sampler = Sampler(cfg, model.device)
    probs = {(): 1.0}
    for _ in range(depth):
        nxt = {}
        for prefix, p in probs.items():
            with torch.no_grad():
                logits = model.model(torch.tensor([prompt + list(prefix)])).logits[0, -1].float()
            dist = sampler.probs(logits)
            for t in range(dist.numel()):
                if dist[t] > 0:
                    nxt[(*prefix, t)] = p * float(dist[t])
        probs = nxt
    return probs


def assert_sampling_preserves_the_target_distribution(cfg: DecodingConfig,
                                                     compiled: bool = False) -> None:
    """ar, layerskip and spec sampled over 1,500 seeds each, through the eager or the
    compiled engine, against the enumerated (warped) target distribution."""
    target = EarlyExitModel(tiny_model(seed=3, num_layers=3, vocab_size=6))
    draft = EarlyExitModel(tiny_model(seed=11, num_layers=1, vocab_size=6))
    prompt = [1, 4, 2, 5]
    exact = _exact_joint(target, prompt, cfg, depth=3)
    n = 1500
    runs = {"ar": {}, "layerskip": {"exit_layer": 1, "k": 2}, "spec": {"draft": draft, "k": 2}}
    for name, kwargs in runs.items():
        counts: dict = {}
        drafted = accepted = 0
        for seed in range(n):
            run_cfg = DecodingConfig(**{**cfg.__dict__, "seed": seed})
            gen = generate(name, target, prompt, run_cfg, compiled=compiled, **kwargs)
            assert gen.compiled == compiled, name
            key = tuple(gen.tokens)
            counts[key] = counts.get(key, 0) + 1
            drafted, accepted = drafted + sum(gen.drafted), accepted + sum(gen.accepted)
        if name != "ar":  # the test must exercise both acceptance and rejection
            assert 0 < accepted < drafted, name
        assert len(counts) > 1, name  # sampled, not greedy: many outputs
        assert _chi_square_p(counts, exact, n) > 1e-3, name


@pytest.mark.parametrize("cfg", [DecodingConfig(max_new_tokens=3, do_sample=True),
                                 DecodingConfig(max_new_tokens=3, do_sample=True,
                                                temperature=0.8, top_k=5, top_p=0.95)],
                         ids=["plain", "warped"])
def test_sampling_preserves_the_target_distribution(cfg):
    assert_sampling_preserves_the_target_distribution(cfg)


@pytest.mark.parametrize("name, kwargs", [("ar", {}),
                                          ("layerskip", {"k": 3, "exit_layer": 2})])
def test_sampling_is_reproducible_for_a_seed_and_not_greedy(target, name, kwargs):
    assert_sampling_is_seeded_and_not_greedy(name, target, PROMPT, 12, **kwargs)


# --- supported architectures -----------------------------------------------------------------

ARCH_CONFIGS = {
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 8}),
    "phi3": (transformers.Phi3Config, {"pad_token_id": 0}),
    "gemma": (transformers.GemmaConfig, {"head_dim": 8}),
    "gemma2": (transformers.Gemma2Config, {"head_dim": 8, "sliding_window": 4}),
}


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_adapter_matches_model_forward_and_layerskip_is_exact(arch):
    config_cls, extra = ARCH_CONFIGS[arch]
    config = config_cls(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, **extra)
    config._attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    adapter = EarlyExitModel(model)
    ids = torch.tensor([[3, 7, 11, 2, 9, 30, 41, 5, 6, 8]])
    with torch.no_grad():
        expected = model(ids).logits[0, -1].float()
        cache = adapter.new_cache()
        hidden = adapter.run_layers(adapter.embed(ids), cache, 0, adapter.num_layers)
        got = adapter.logits(hidden)[0, -1]
    torch.testing.assert_close(got, expected)
    prompt = ids[0].tolist()
    ar = generate("ar", adapter, prompt, DecodingConfig(max_new_tokens=12)).tokens
    for e, k in itertools.product((1, 2), (2, 5)):
        gen = generate("layerskip", adapter, prompt, DecodingConfig(max_new_tokens=12),
                       k=k, exit_layer=e)
        assert gen.tokens == ar, (arch, e, k)


# --- refusals ---------------------------------------------------------------------------------

def test_unsupported_architecture_is_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(LsbenchError, match=r"unsupported architecture 'gpt2'.*llama"):
        EarlyExitModel(model)
    with pytest.raises(LsbenchError, match="unsupported architecture"):
        check_architecture(model.config)


def test_draft_with_another_vocabulary_is_refused(target):
    other = EarlyExitModel(tiny_model(seed=1, num_layers=2, vocab_size=50))
    for strategy in ("spec", "hf-assisted"):
        with pytest.raises(LsbenchError, match="vocabulary"):
            generate(strategy, target, PROMPT, GREEDY, k=2, draft=other)


@pytest.mark.parametrize("exit_layer", [0, -1, 5, None])
def test_exit_layer_out_of_range_is_refused(target, exit_layer):
    for strategy in ("layerskip", "hf-early-exit"):
        with pytest.raises(LsbenchError, match=r"exit layer .* out of range.*1\.\.4"):
            generate(strategy, target, PROMPT, GREEDY, k=2, exit_layer=exit_layer)


def test_bad_speculation_count_is_refused(target):
    with pytest.raises(LsbenchError, match="speculations"):
        generate("layerskip", target, PROMPT, GREEDY, k=0, exit_layer=2)
