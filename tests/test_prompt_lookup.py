"""Prompt-lookup drafting: the n-gram matcher on its own, then `pld` in the decoding loop
(greedy equals autoregressive, sampling preserves the target distribution) and the lossy
`exit` strategy against a hand-run forward over the first E layers."""

from __future__ import annotations

import pytest
import torch

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.prompt_lookup import MAX_NGRAM, lookup_drafts
from lsbench.engine.strategies import LOSSY, STRATEGIES, generate
from lsbench.errors import LsbenchError
from tests.conftest import assert_sampling_is_seeded_and_not_greedy, tiny_model
from tests.test_engine import _chi_square_p, _exact_joint

# --- the matcher ----------------------------------------------------------------------------


def test_longest_ngram_wins_over_a_shorter_one():
    # "9" alone recurs at 1 (followed by 7), but "5 9" recurs at 4 (followed by 6 6).
    tokens = [3, 9, 7, 2, 5, 9, 6, 6, 1, 5, 9]
    assert lookup_drafts(tokens, 2) == [6, 6]
    assert lookup_drafts(tokens, 2, max_ngram=1) == [7, 2]  # unigram: earliest "9"


def test_default_ngram_size_is_transformers_default():
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    assert PromptLookupCandidateGenerator().max_matching_ngram_size == MAX_NGRAM == 2
    # A trigram match is not looked for by default: the bigram's earliest occurrence wins.
    tokens = [4, 5, 1, 8, 3, 4, 5, 2, 3, 4, 5]
    assert lookup_drafts(tokens, 1) == [1]
    assert lookup_drafts(tokens, 1, max_ngram=3) == [2]


def test_earliest_occurrence_is_chosen_like_transformers():
    tokens = [7, 1, 2, 7, 3, 4, 7, 5, 6, 7]
    assert lookup_drafts(tokens, 2) == [1, 2]
    ids = torch.tensor([tokens])
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    theirs, _ = PromptLookupCandidateGenerator(num_output_tokens=2, max_length=100) \
        .get_candidates(ids)
    assert theirs[0, len(tokens):].tolist() == [1, 2]


def test_no_match_drafts_nothing():
    assert lookup_drafts([1, 2, 3, 4], 4) == []
    assert lookup_drafts([5], 4) == []
    assert lookup_drafts([], 4) == []
    assert lookup_drafts([1, 2, 1], 0) == []  # no budget


def test_match_right_before_the_end_proposes_only_what_exists():
    # The only earlier "8" is the token before last: one token follows it (the last one).
    assert lookup_drafts([1, 2, 8, 8], 5) == [8]
    # The n-gram ending the text never matches itself.
    assert lookup_drafts([1, 2, 3], 5) == []
    # Near the end the continuation is cut by the end of the text.
    assert lookup_drafts([6, 1, 2, 3, 6], 10) == [1, 2, 3, 6]


def test_proposal_ends_at_the_first_stop_token():
    tokens = [4, 1, 2, 0, 9, 9, 4]
    assert lookup_drafts(tokens, 6) == [1, 2, 0, 9, 9, 4]
    assert lookup_drafts(tokens, 6, stop_token_ids={0}) == [1, 2, 0]
    assert lookup_drafts(tokens, 6, stop_token_ids={2, 0}) == [1, 2]
    assert lookup_drafts(tokens, 6, stop_token_ids={1}) == [1]


# --- pld in the decoding loop ---------------------------------------------------------------

# A prompt with recurring n-grams, so that lookups hit from the first round on.
PROMPT = [1, 5, 9, 17, 33, 5, 9, 17, 4, 60, 12, 5, 9]
GREEDY = DecodingConfig(max_new_tokens=40)


@pytest.fixture(scope="module")
def ar_tokens(target) -> list[int]:
    return generate("ar", target, PROMPT, GREEDY).tokens


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_pld_greedy_equals_ar(target, ar_tokens, k):
    gen = generate("pld", target, PROMPT, GREEDY, k=k)
    assert gen.tokens == ar_tokens
    assert "pld" in STRATEGIES
    # The run exercised accepted drafts, rejected drafts and rounds without a match.
    assert 0 < sum(gen.accepted) < sum(gen.drafted)
    assert 0 in gen.drafted and any(d > 0 for d in gen.drafted)
    assert all(0 <= a <= d <= k for a, d in zip(gen.accepted, gen.drafted, strict=True))
    assert gen.decode_tokens == sum(gen.accepted) + len(gen.drafted) == len(gen.tokens) - 1
    assert gen.draft_s > 0


def test_pld_costs_one_full_forward_per_round_and_no_drafting_work(target):
    gen = generate("pld", target, PROMPT, GREEDY, k=4)
    L = target.num_layers
    verified = sum(d + 1 for d in gen.drafted)  # the pending token and every draft
    assert gen.decode_counts.layer_tokens == [verified] * L
    assert gen.decode_counts.layer_calls == [len(gen.drafted)] * L
    assert gen.draft_decode_counts is None and gen.prefill_counts.layer_tokens == [len(PROMPT)] * L
    # Position 0's head row always, the other rows only after an accepted first draft.
    heads = sum(1 + (d if a > 0 else 0) for d, a in zip(gen.drafted, gen.accepted, strict=True))
    assert gen.decode_counts.head_tokens == heads


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7, 19])
def test_pld_budget_cuts_equal_ar(target, ar_tokens, max_new_tokens):
    cfg = DecodingConfig(max_new_tokens=max_new_tokens)
    for k in (1, 4, 8):
        gen = generate("pld", target, PROMPT, cfg, k=k)
        assert gen.tokens == ar_tokens[:max_new_tokens], k
        assert gen.decode_tokens == sum(gen.accepted) + len(gen.drafted)


def test_pld_stops_at_stop_tokens_and_never_drafts_past_them(target, ar_tokens, monkeypatch):
    from lsbench.engine.strategies import PromptLookupSpeculator

    proposals: list[list[int]] = []
    real = PromptLookupSpeculator.draft

    def spy(self, committed, k, sampler):
        tokens, probs = real(self, committed, k, sampler)
        proposals.append(tokens)
        return tokens, probs

    monkeypatch.setattr(PromptLookupSpeculator, "draft", spy)
    # The prompt holds the first 24 greedy tokens, so the model's loop is in it: lookups then
    # propose the stop token among correct drafts, and a round can end on an accepted draft.
    prompt = PROMPT + ar_tokens[:24]
    cuts = 0
    for stop in dict.fromkeys(ar_tokens[24:30]):
        cfg = DecodingConfig(max_new_tokens=16, stop_token_ids=(stop,))
        expected = generate("ar", target, prompt, cfg).tokens
        assert expected[-1] == stop
        for k in (2, 4, 8):
            proposals.clear()
            gen = generate("pld", target, prompt, cfg, k=k)
            assert gen.tokens == expected, (stop, k)
            assert all(stop not in p[:-1] for p in proposals)
            # A round whose accepted drafts end with the stop token emits no bonus token.
            cut = sum(gen.accepted) + len(gen.drafted) - gen.decode_tokens
            assert cut in (0, 1) and gen.decode_tokens == len(gen.tokens) - 1
            cuts += cut
    assert cuts > 0


def test_pld_rejects_a_bad_speculation_count(target):
    with pytest.raises(LsbenchError, match="must be >= 1"):
        generate("pld", target, PROMPT, GREEDY, k=0)


@pytest.mark.parametrize("cfg", [DecodingConfig(max_new_tokens=3, do_sample=True),
                                 DecodingConfig(max_new_tokens=3, do_sample=True,
                                                temperature=0.8, top_k=5, top_p=0.95)],
                         ids=["plain", "warped"])
def test_pld_sampling_preserves_the_target_distribution(cfg):
    target = EarlyExitModel(tiny_model(seed=3, num_layers=3, vocab_size=6))
    prompt = [1, 4, 2, 5, 4, 2, 3]  # every token but 0 recurs: most rounds draft
    exact = _exact_joint(target, prompt, cfg, depth=3)
    n = 1500
    counts: dict = {}
    drafted = accepted = 0
    for seed in range(n):
        gen = generate("pld", target, prompt, DecodingConfig(**{**cfg.__dict__, "seed": seed}),
                       k=2)
        counts[tuple(gen.tokens)] = counts.get(tuple(gen.tokens), 0) + 1
        drafted, accepted = drafted + sum(gen.drafted), accepted + sum(gen.accepted)
    assert 0 < accepted < drafted  # both acceptance and rejection exercised
    assert len(counts) > 1  # sampled, not greedy: many outputs
    assert _chi_square_p(counts, exact, n) > 1e-3


def test_pld_sampling_check_can_fail(monkeypatch):
    """The chi-square check above rejects a drafter whose q is not the point mass it draws
    from (here uniform): the rejection rule then keeps the wrong share of lookups."""
    from lsbench.engine.strategies import PromptLookupSpeculator

    real = PromptLookupSpeculator.draft

    def uniform_q(self, committed, k, sampler):
        tokens, _ = real(self, committed, k, sampler)
        return tokens, [torch.full((self.model.vocab_size,), 1 / self.model.vocab_size)
                        for _ in tokens]

    monkeypatch.setattr(PromptLookupSpeculator, "draft", uniform_q)
    target = EarlyExitModel(tiny_model(seed=3, num_layers=3, vocab_size=6))
    prompt = [1, 4, 2, 5, 4, 2, 3]
    cfg = DecodingConfig(max_new_tokens=3, do_sample=True)
    exact = _exact_joint(target, prompt, cfg, depth=3)
    n = 1500
    counts: dict = {}
    for seed in range(n):
        gen = generate("pld", target, prompt, DecodingConfig(**{**cfg.__dict__, "seed": seed}),
                       k=2)
        counts[tuple(gen.tokens)] = counts.get(tuple(gen.tokens), 0) + 1
    assert _chi_square_p(counts, exact, n) < 1e-3


# --- the lossy early exit -------------------------------------------------------------------

def hand_run_exit(model: EarlyExitModel, prompt: list[int], exit_layer: int,
                  steps: int) -> list[int]:
    """Greedy decoding through layers [0, E) + final norm + LM head, recomputing the whole
    sequence every step with a plain loop over the decoder layers (no cache, no adapter)."""
    m, ids = model.model, list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            hidden = m.model.embed_tokens(torch.tensor([ids]))
            pos = torch.arange(len(ids)).unsqueeze(0)
            rope = m.model.rotary_emb(hidden, position_ids=pos)
            mask = torch.full((len(ids), len(ids)), float("-inf"), dtype=hidden.dtype).triu(1)
            for layer in m.model.layers[:exit_layer]:
                hidden = layer(hidden, attention_mask=mask[None, None], position_ids=pos,
                               position_embeddings=rope)
            ids.append(int(m.lm_head(m.model.norm(hidden[:, -1])).argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("exit_layer", [1, 2, 3, 4])
def test_exit_equals_a_hand_run_forward_over_the_first_layers(target, ar_tokens, exit_layer):
    gen = generate("exit", target, PROMPT, DecodingConfig(max_new_tokens=12),
                   exit_layer=exit_layer)
    assert gen.tokens == hand_run_exit(target, PROMPT, exit_layer, 12)
    assert "exit" in LOSSY
    if exit_layer == target.num_layers:  # exiting at the last layer is autoregressive decoding
        assert gen.tokens == ar_tokens[:12]
    # The prompt and every token go through layers [0, E) only; one head row per token.
    L, E = target.num_layers, exit_layer
    assert gen.prefill_counts.layer_tokens == [len(PROMPT)] * E + [0] * (L - E)
    assert gen.decode_counts.layer_tokens == [11] * E + [0] * (L - E)
    assert gen.prefill_counts.head_tokens == 1 and gen.decode_counts.head_tokens == 11
    assert gen.drafted == [] and gen.decode_tokens == 11


def test_shallow_exit_differs_from_the_full_model(target, ar_tokens):
    # Lossy for real: the random tiny model's first layer disagrees with its last.
    assert generate("exit", target, PROMPT, GREEDY, exit_layer=1).tokens != ar_tokens


def test_exit_refuses_a_missing_or_out_of_range_layer(target):
    for bad in (None, 0, target.num_layers + 1):
        with pytest.raises(LsbenchError, match="out of range"):
            generate("exit", target, PROMPT, GREEDY, exit_layer=bad)


@pytest.mark.parametrize("name, kwargs", [("exit", {"exit_layer": 2}), ("pld", {"k": 3})])
def test_sampling_is_reproducible_and_not_greedy(target, name, kwargs):
    assert_sampling_is_seeded_and_not_greedy(name, target, PROMPT, 10, **kwargs)


@pytest.mark.parametrize("k", [2, 4])
def test_hf_pld_equals_ar_with_the_same_rounds_as_pld(target, ar_tokens, k):
    # Same matcher settings: transformers' prompt lookup verifies as many rounds as lsbench's.
    theirs = generate("hf-pld", target, PROMPT, GREEDY, k=k)
    ours = generate("pld", target, PROMPT, GREEDY, k=k)
    assert theirs.tokens == ar_tokens
    assert theirs.decode_counts.layer_calls[-1] == len(ours.drafted)
