"""transformers' own `generate()` as a reference: `hf-ar`, `hf-assisted` (a draft model) and
`hf-early-exit` (`assistant_early_exit`), timed and counted the way lsbench's loops are.

Layer-token work is counted through forward hooks on the unmodified model, and a streamer
marks the first new token so that prefill and decode split at the same point as in
`strategies`.
"""

from __future__ import annotations

import contextlib
import time

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from lsbench.errors import LsbenchError
from lsbench.generation import DecodingConfig, Generation, prompt_tensor, sync
from lsbench.models import (
    EarlyExitModel,
    EvalCounts,
    attended_pairs,
    check_draft_vocabulary,
    check_exit_layers,
)

HF_STRATEGIES = ("hf-ar", "hf-assisted", "hf-early-exit")


class _FirstTokenClock(BaseStreamer):
    """Marks the moment generate() hands out its first new token(s), and the work done by then,
    so that prefill and decode are split the same way as in lsbench's own loops."""

    def __init__(self, device, models: list[EarlyExitModel]):
        self.device, self.models, self.calls = device, models, 0
        self.first_at: float | None = None
        self.first_count = 0
        self.counts_at_first: list[EvalCounts] = []

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # call 1 is the prompt
            sync(self.device)
            self.first_at = time.perf_counter()
            self.first_count = int(value.numel())
            self.counts_at_first = [m.counts.copy() for m in self.models]

    def end(self) -> None:
        pass


@contextlib.contextmanager
def _pinned_assistant(assistant: torch.nn.Module, k: int):
    """generate() reads the assistant's settings from the assistant model's own generation
    config (by default up to 20 tokens, stopping early below 0.4 confidence), not from the
    config passed to generate(): pin them there, and restore them afterwards."""
    cfg = assistant.generation_config
    keys = ("num_assistant_tokens", "num_assistant_tokens_schedule",
            "assistant_confidence_threshold")
    saved = {key: getattr(cfg, key, None) for key in keys}
    cfg.num_assistant_tokens = k
    cfg.num_assistant_tokens_schedule = "constant"
    cfg.assistant_confidence_threshold = 0.0  # falsy: no confidence-based early stop
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(cfg, key, value)


class CountingHooks:
    """Counts layer-token evaluations of an unmodified transformers model via forward hooks."""

    def __init__(self, model: EarlyExitModel):
        self.model = model
        self.handles = []

    def __enter__(self) -> CountingHooks:
        m, counts = self.model, self.model.counts
        for i, layer in enumerate(m.backbone.layers):
            def pre(_mod, args, kwargs, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                pos = kwargs.get("position_ids")
                n = hidden.shape[1]
                start = int(pos[0, 0]) if pos is not None else 0
                counts.layer_tokens[i] += n
                counts.layer_calls[i] += 1
                counts.attn_pairs[i] += attended_pairs(start, n, m.windows[i])
            self.handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))

        def head(_mod, args):
            counts.head_tokens += args[0].shape[1]
            counts.head_calls += 1

        def embed(_mod, args):
            counts.embed_tokens += args[0].shape[1]
        self.handles.append(m.model.lm_head.register_forward_pre_hook(head))
        self.handles.append(m.backbone.embed_tokens.register_forward_pre_hook(embed))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def generate_hf(model: EarlyExitModel, prompt_ids: list[int], cfg: DecodingConfig, strategy: str,
                *, k: int = 4, exit_layer: int | None = None,
                draft: EarlyExitModel | None = None) -> Generation:
    """`hf-ar`, `hf-assisted` or `hf-early-exit` through model.generate()."""
    extra: dict = {}
    early_exit = None
    if strategy == "hf-assisted":
        if draft is None:
            raise LsbenchError("hf-assisted needs a draft model")
        check_draft_vocabulary(model, draft)
        extra["assistant_model"] = draft.model
    elif strategy == "hf-early-exit":
        check_exit_layers([exit_layer], model.num_layers)
        early_exit = exit_layer
    gen_cfg = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=0, do_sample=cfg.do_sample,
        temperature=cfg.temperature if cfg.do_sample else None,
        top_k=cfg.top_k if cfg.do_sample and cfg.top_k > 0 else None,
        top_p=cfg.top_p if cfg.do_sample and cfg.top_p < 1.0 else None,
        eos_token_id=list(cfg.stop_token_ids) or None,
        pad_token_id=cfg.stop_token_ids[0] if cfg.stop_token_ids else 0,
        # Pin the assistant: k tokens every round, no adaptive schedule or early stop.
        num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
        assistant_confidence_threshold=0.0, assistant_early_exit=early_exit,
    )
    prompt = prompt_tensor(model, prompt_ids)
    models = [model] if draft is None else [model, draft]
    clock = _FirstTokenClock(model.device, models)
    torch.manual_seed(cfg.seed)
    start = [m.counts.copy() for m in models]
    assistant = draft.model if draft is not None else model.model
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(CountingHooks(m))
        if strategy != "hf-ar":
            stack.enter_context(_pinned_assistant(assistant, k))
        sync(model.device)
        t0 = time.perf_counter()
        output = model.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      generation_config=gen_cfg, streamer=clock, **extra)
        sync(model.device)
        t2 = time.perf_counter()
    tokens = output[0, prompt.shape[1]:].tolist()
    t1 = clock.first_at or t2
    first = clock.counts_at_first or [m.counts.copy() for m in models]
    prefill_counts = [f.minus(s) for f, s in zip(first, start, strict=True)]
    decode_counts = [m.counts.minus(f) for m, f in zip(models, first, strict=True)]
    return Generation(
        tokens, t1 - t0, t2 - t1, max(len(tokens) - clock.first_count, 0),
        prefill_counts=prefill_counts[0], decode_counts=decode_counts[0],
        draft_prefill_counts=prefill_counts[1] if draft else None,
        draft_decode_counts=decode_counts[1] if draft else None,
    )
