"""Prompt-lookup drafting (PLD): the n-gram matcher, a pure function of the committed tokens.

Defaults and choices follow transformers' `PromptLookupCandidateGenerator`, so that `pld` and
`hf-pld` propose the same drafts and a comparison of the two measures the engines, not the
matchers:
- n-grams of at most `MAX_NGRAM` = 2 tokens (transformers' `max_matching_ngram_size` default),
  longest first, down to 1;
- of several earlier occurrences, the EARLIEST one (transformers scans left to right and takes
  the first whose continuation is not empty); the n-gram ending the text itself never counts,
  since nothing follows it;
- up to k tokens that followed it, fewer when the text ends first.
One deliberate difference: transformers drops a stop token and everything after it from the
proposal; here the proposal keeps the first stop token and ends there, so a draft can finish
the generation, and nothing past a stop token is ever proposed.
"""

from __future__ import annotations

from collections.abc import Collection

MAX_NGRAM = 2


def lookup_drafts(tokens: list[int], k: int, *, max_ngram: int = MAX_NGRAM,
                  stop_token_ids: Collection[int] = ()) -> list[int]:
    """Up to k tokens that followed the earliest earlier occurrence of the longest n-gram
    (n = max_ngram .. 1) ending `tokens`; [] when no n-gram recurs or k < 1."""
    n_tokens = len(tokens)
    if k < 1:
        return []
    for n in range(min(max_ngram, n_tokens - 1), 0, -1):
        tail = tokens[n_tokens - n:]
        last_start = n_tokens - n  # exclusive: an occurrence must be followed by a token
        start = -1
        while True:
            try:  # list.index scans in C: the first candidate position for the n-gram
                start = tokens.index(tail[0], start + 1, last_start)
            except ValueError:
                break
            if tokens[start:start + n] == tail:
                return _through_first_stop(tokens[start + n:start + n + k], stop_token_ids)
    return []


def _through_first_stop(drafts: list[int], stop_token_ids: Collection[int]) -> list[int]:
    for i, token in enumerate(drafts):
        if token in stop_token_ids:
            return drafts[: i + 1]
    return drafts
