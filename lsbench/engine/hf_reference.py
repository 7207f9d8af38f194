"""transformers' own `generate()` as a reference: `hf-ar`, `hf-ar-compiled` (its static cache
and torch.compile), `hf-assisted` (a draft model), `hf-early-exit` (`assistant_early_exit`) and
`hf-pld` (`prompt_lookup_num_tokens`), timed and counted the way lsbench's loops are.

Layer-token work is counted through forward hooks on the unmodified model, from shapes and the
cache's host-side lengths (never a device value: that would be a host sync per layer inside
the timed call); `hf-ar-compiled` runs without hooks (they would be traced into its graph) and
is counted from its token counts. A streamer marks the first new token so that prefill and
decode split at the same point as in `strategies`.
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig, StaticCache
from transformers.generation.configuration_utils import CompileConfig
from transformers.generation.streamers import BaseStreamer

from lsbench.backend.early_exit import (
    EarlyExitModel,
    EvalCounts,
    attended_pairs,
    check_draft_vocabulary,
    check_exit_layers,
)
from lsbench.backend.kv_cache import cache_bytes, cache_capacity_bytes
from lsbench.engine.generation import DecodingConfig, Generation, prompt_tensor, sync
from lsbench.engine.prompt_lookup import MAX_NGRAM
from lsbench.errors import LsbenchError

if TYPE_CHECKING:  # batch.py imports strategies, which imports this module
    from lsbench.engine.batch import BatchGeneration

HF_STRATEGIES = ("hf-ar", "hf-ar-compiled", "hf-assisted", "hf-early-exit", "hf-pld")
# hf-ar-compiled's static cache holds prompt + max_new_tokens rounded up to a multiple of this,
# so that prompts of similar length decode with one compiled graph (transformers' default, a
# cache of exactly prompt + max_new_tokens, would compile again for every prompt length).
STATIC_CACHE_BUCKET = 256


class _FirstTokenClock(BaseStreamer):
    """Marks the moment generate() hands out its first new token(s), and the work done by then,
    so that prefill and decode are split the same way as in lsbench's own loops."""

    def __init__(self, device, models: list[EarlyExitModel]):
        self.device, self.models, self.calls = device, models, 0
        self.first_at: float | None = None
        self.first_count = 0
        self.counts_at_first: list[EvalCounts] = []
        self.step_at: list[float] = []  # each later hand-out: when, and how many tokens
        self.step_tokens: list[int] = []

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # call 1 is the prompt
            sync(self.device)
            self.first_at = time.perf_counter()
            self.first_count = int(value.numel())
            self.counts_at_first = [m.counts.copy() for m in self.models]
        elif self.calls > 2:  # generate() has the tokens on the host to check its stops
            self.step_at.append(time.perf_counter())
            self.step_tokens.append(int(value.numel()))

    def end(self) -> None:
        pass


def neutral_generation_config(cfg: DecodingConfig, *, k: int = 4, early_exit: int | None = None,
                              prompt_lookup: bool = False) -> GenerationConfig:
    """A complete GenerationConfig that decodes exactly as lsbench's own loops do.

    generate() fills every knob left at None from the checkpoint's generation_config.json and
    then from its global defaults (top_k=50): each logits processor is therefore set to its
    explicit "off" value here, and `_neutral_models` hides the checkpoint's config for the
    knobs whose "off" is None (bad words, forced tokens, suppressions, biases, min_p, ...)."""
    sampling = cfg.do_sample
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=0, min_length=0, do_sample=sampling,
        num_beams=1, num_return_sequences=1, use_cache=True,
        temperature=cfg.temperature if sampling else 1.0,
        top_k=cfg.top_k if sampling else 0,  # 0: off (not generate()'s default 50)
        top_p=cfg.top_p if sampling else 1.0, typical_p=1.0, epsilon_cutoff=0.0,
        eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        length_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
        renormalize_logits=False, remove_invalid_values=False, guidance_scale=1.0,
        return_dict_in_generate=True,  # for the cache it used (kv_cache_bytes)
        eos_token_id=list(cfg.stop_token_ids) or None,
        pad_token_id=cfg.stop_token_ids[0] if cfg.stop_token_ids else 0,
        # Pin the assistant: k tokens every round, no adaptive schedule or early stop
        # (generate() reads these from the assistant model's own generation_config).
        num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
        assistant_confidence_threshold=0.0, assistant_early_exit=early_exit,
        # hf-pld: k looked-up tokens a round, the n-gram size `pld` uses (transformers' default).
        prompt_lookup_num_tokens=k if prompt_lookup else None,
        max_matching_ngram_size=MAX_NGRAM if prompt_lookup else None,
    )


# Switches that make generate() assisted: they belong to the one generate() call, never to a
# model's own config. The early-exit and assisted candidate generators clear them (None) for
# the assistant's inner generate() calls, and generate() fills a None from the model's config:
# left there, they would make every drafting call assisted again, without the drafter's cache.
_CALL_ONLY = ("assistant_early_exit", "prompt_lookup_num_tokens", "max_matching_ngram_size")


@contextlib.contextmanager
def _neutral_models(models: list[torch.nn.Module], gen_cfg: GenerationConfig):
    """Replace each model's own generation_config by `gen_cfg`, less the call-only switches,
    while generate() runs: both the target's and the assistant's generate() merge it into
    every knob left at None."""
    saved = [m.generation_config for m in models]
    own = copy.deepcopy(gen_cfg)
    for key in _CALL_ONLY:
        setattr(own, key, None)
    try:
        for m in models:
            m.generation_config = copy.deepcopy(own)
        yield
    finally:
        for m, old in zip(models, saved, strict=True):
            m.generation_config = old


def _cached_length(kwargs: dict, i: int) -> int | None:
    """Tokens layer i's cache holds before a call, when the host knows it: a dynamic cache's
    length is a shape (or a Python counter for sliding windows); None otherwise."""
    cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value")
                  if kwargs.get(k) is not None), None)
    layers = getattr(cache, "layers", None)
    if not layers or i >= len(layers):
        return None
    length = layers[i].get_seq_length()
    return length if isinstance(length, int) else None


class CountingHooks:
    """Counts layer-token evaluations of an unmodified transformers model via forward hooks,
    from shapes: a call's first position is the length its layer's cache holds (rolled back
    by generate() after a rejected draft), read without touching device memory."""

    def __init__(self, model: EarlyExitModel):
        self.model = model
        self.handles = []

    def __enter__(self) -> CountingHooks:
        m = self.model
        for i, layer in enumerate(m.backbone.layers):
            def pre(_mod, args, kwargs, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                start = _cached_length(kwargs, i)
                if start is None:  # no host-side length (never so with generate()'s caches)
                    pos = kwargs.get("position_ids")
                    start = int(pos[0, 0]) if pos is not None else 0
                count_layer(m, i, start, hidden.shape[1])
            self.handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))

        def head(_mod, args):
            count_head(m, args[0].shape[1])

        def embed(_mod, args):
            m.counts.embed_tokens += args[0].shape[1]
        self.handles.append(m.model.lm_head.register_forward_pre_hook(head))
        self.handles.append(m.backbone.embed_tokens.register_forward_pre_hook(embed))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def count_layer(model: EarlyExitModel, i: int, start: int, n: int) -> None:
    """Layer i evaluated n tokens at positions start.. (what one hooked call counts)."""
    counts = model.counts
    counts.layer_tokens[i] += n
    counts.layer_calls[i] += 1
    counts.attn_pairs[i] += attended_pairs(start, n, model.windows[i])


def count_head(model: EarlyExitModel, rows: int) -> None:
    model.counts.head_tokens += rows
    model.counts.head_calls += 1


def count_ar_forward(model: EarlyExitModel, start: int, n: int) -> None:
    """One forward of generate()'s autoregressive loop over n tokens at positions start..:
    every layer, and the LM head on the last row only (generate() keeps one row of logits)."""
    model.counts.embed_tokens += n
    for i in range(model.num_layers):
        count_layer(model, i, start, n)
    count_head(model, 1)


def _static_committed_bytes(cache: StaticCache, length: int) -> int:
    """Bytes the first `length` positions occupy in a static cache (a sliding layer holds at
    most its window)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                per_position = t.numel() // t.shape[-2] * t.element_size()
                total += per_position * min(length, t.shape[-2])
    return total


def _compiled_generation_config(gen_cfg: GenerationConfig, device: torch.device
                                ) -> GenerationConfig:
    """`gen_cfg` with generate()'s own torch.compile of the decoding forward: transformers'
    CompileConfig defaults (inductor, mode reduce-overhead: CUDA graphs on CUDA). generate()
    compiles only on accelerators unless its CompileConfig says all devices; it says so here,
    so that hf-ar-compiled is compiled wherever it runs."""
    gen_cfg = copy.deepcopy(gen_cfg)
    gen_cfg.compile_config = CompileConfig()
    if device.type != "cuda":
        gen_cfg.compile_config._compile_all_devices = True
    return gen_cfg


def _generate_arguments(model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig,
                        strategy: str, k: int, exit_layer: int | None,
                        draft: EarlyExitModel | None) -> tuple[GenerationConfig, dict]:
    """What generate() is called with for one hf-* strategy: its generation config and the
    extra arguments (the assistant model, hf-ar-compiled's static cache). Refuses what
    transformers cannot run like for like."""
    extra: dict = {}
    early_exit = None
    if strategy == "hf-assisted":
        if draft is None:
            raise LsbenchError("hf-assisted needs a draft model")
        check_draft_vocabulary(model, draft)
        rows = (model.model.lm_head.out_features, draft.model.lm_head.out_features)
        if rows[0] != rows[1]:
            raise LsbenchError(
                f"hf-assisted needs LM heads of one size: transformers' assisted generation "
                f"treats heads of {rows[0]} and {rows[1]} rows as two tokenizers; "
                "lsbench's spec handles padded vocabularies")
        extra["assistant_model"] = draft.model
    elif strategy == "hf-early-exit":
        check_exit_layers([exit_layer], model.num_layers)
        early_exit = exit_layer
    gen_cfg = neutral_generation_config(cfg, k=k, early_exit=early_exit,
                                        prompt_lookup=strategy == "hf-pld")
    padded = range(model.vocab_size, model.model.lm_head.out_features)
    if len(padded):  # LM-head rows past the tokenizer: never chosen, as in lsbench's loops
        gen_cfg.suppress_tokens = list(padded)
    if strategy == "hf-ar-compiled":  # the static cache generate() builds for "static"
        gen_cfg = _compiled_generation_config(gen_cfg, model.device)
        bucket = STATIC_CACHE_BUCKET
        capacity = -(-(len(prompt_ids) + cfg.max_new_tokens) // bucket) * bucket
        extra["cache"] = StaticCache(config=model.model.config, max_cache_len=capacity)
    return gen_cfg, extra


@torch.inference_mode()
def generate_hf(model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig, strategy: str,
                *, k: int = 4, exit_layer: int | None = None,
                draft: EarlyExitModel | None = None) -> Generation:
    """`hf-ar`, `hf-ar-compiled`, `hf-assisted`, `hf-early-exit` or `hf-pld` through
    model.generate()."""
    gen_cfg, extra = _generate_arguments(model, prompt_ids, cfg, strategy, k, exit_layer, draft)
    prompt = prompt_tensor(model, prompt_ids)
    compiled = strategy == "hf-ar-compiled"
    models = [model] if draft is None else [model, draft]
    clock = _FirstTokenClock(model.device, models)
    torch.manual_seed(cfg.seed)
    start = [m.counts.copy() for m in models]
    with contextlib.ExitStack() as stack:
        for m in models if not compiled else []:  # hooks would be traced into the graph
            stack.enter_context(CountingHooks(m))
        stack.enter_context(_neutral_models([m.model for m in models], gen_cfg))
        sync(model.device)
        t0 = time.perf_counter()
        output = model.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      generation_config=gen_cfg, streamer=clock, **extra)
        # (the assistant's own cache stays inside generate(): only the target's is counted)
        sync(model.device)
        t2 = time.perf_counter()
    tokens = output.sequences[0, prompt.shape[1]:].tolist()
    t1 = clock.first_at or t2
    first = clock.counts_at_first or [m.counts.copy() for m in models]
    if compiled:  # what the hooks would have counted: a prefill, then one token a forward
        count_ar_forward(model, 0, len(prompt_ids))
        first = [model.counts.copy()]
        for t in range(len(tokens) - 1):
            count_ar_forward(model, len(prompt_ids) + t, 1)
    cache = output.past_key_values
    committed = (_static_committed_bytes(cache, len(prompt_ids) + len(tokens) - 1)
                 if compiled else cache_bytes(cache))
    prefill_counts = [f.minus(s) for f, s in zip(first, start, strict=True)]
    decode_counts = [m.counts.minus(f) for m, f in zip(models, first, strict=True)]
    return Generation(
        tokens, t1 - t0, t2 - t1, max(len(tokens) - clock.first_count, 0),
        prefill_counts=prefill_counts[0], decode_counts=decode_counts[0],
        draft_prefill_counts=prefill_counts[1] if draft else None,
        draft_decode_counts=decode_counts[1] if draft else None,
        kv_cache_bytes=committed, kv_cache_capacity_bytes=cache_capacity_bytes(cache),
        step_end_s=[at - t1 for at in clock.step_at], step_tokens=clock.step_tokens,
        compiled=compiled,
    )


@torch.inference_mode()
def generate_hf_batch(model: EarlyExitModel, prompts: list[list[int]],
                      cfg: DecodingConfig) -> BatchGeneration:
    """`hf-ar` at batch B: generate() over the prompts left-padded, with the 2-D attention
    mask (generate() derives each row's positions from it). generate() decodes every row
    each step until all have finished (finished rows emit padding), so each row is given the
    batch's evaluation counts and an equal share of its cache; a row's decode ends at its
    own last token (stop token included), the batch's at the last row's."""
    from lsbench.engine.batch import BatchGeneration

    gen_cfg = neutral_generation_config(cfg)
    padded = range(model.vocab_size, model.model.lm_head.out_features)
    if len(padded):
        gen_cfg.suppress_tokens = list(padded)
    width = max(len(p) for p in prompts)
    if not min(len(p) for p in prompts):
        raise LsbenchError("empty prompt")
    pad = gen_cfg.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                        device=model.device)
    clock = _FirstTokenClock(model.device, [model])
    torch.manual_seed(cfg.seed)
    start = model.counts.copy()
    with CountingHooks(model), _neutral_models([model.model], gen_cfg):
        sync(model.device)
        t0 = time.perf_counter()
        output = model.model.generate(ids, attention_mask=mask, generation_config=gen_cfg,
                                      streamer=clock)
        sync(model.device)
        t2 = time.perf_counter()
    t1 = clock.first_at or t2
    first = clock.counts_at_first[0] if clock.counts_at_first else model.counts.copy()
    prefill_counts, decode_counts = first.minus(start), model.counts.minus(first)
    kv = cache_bytes(output.past_key_values) // len(prompts)
    kv_capacity = cache_capacity_bytes(output.past_key_values) // len(prompts)
    steps = [at - t1 for at in clock.step_at]
    rows = []
    for seq in output.sequences[:, width:].tolist():
        stop = next((i for i, t in enumerate(seq) if t in cfg.stop_token_ids), len(seq) - 1)
        tokens = seq[:stop + 1]  # what follows a row's stop token is padding
        own = steps[:len(tokens) - 1]  # step i emits token i + 1
        rows.append(Generation(
            tokens, t1 - t0, own[-1] if own else 0.0, len(tokens) - 1,
            prefill_counts=prefill_counts, decode_counts=decode_counts,
            kv_cache_bytes=kv, kv_cache_capacity_bytes=kv_capacity,
            step_end_s=own, step_tokens=[1] * len(own)))
    return BatchGeneration(rows, t1 - t0, t2 - t1)
