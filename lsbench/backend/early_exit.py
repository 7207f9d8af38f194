"""The early-exit adapter: drive a decoder-only transformers model one layer range at a
time (embed, layers [lo, hi), final norm + LM head) against one shared KV cache, so that
drafting (layers [0, E)) and verification (layers [E, L)) reuse each other's entries, and count
every layer-token evaluation, which the FLOPs and bytes accounting is built from."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lsbench.backend.kv_cache import CAPACITY_QUANTUM, LayerSlot, StaticKVCache, attention_mask
from lsbench.errors import LsbenchError

# model_type values whose layout (model.model.{embed_tokens,layers,norm,rotary_emb},
# model.lm_head) and decoder-layer call signature the adapter is tested against.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2")

def check_exit_layers(layers: list[int | None], num_layers: int, model: str = "the model") -> None:
    """The one exit-layer check: every E in 1..L (E = L drafts with the full model)."""
    bad = [e for e in layers if e is None or not 1 <= e <= num_layers]
    if bad:
        what = "exit layer" if len(bad) == 1 else "exit layers"
        raise LsbenchError(f"{what} {', '.join(map(str, bad))} out of range: {model} has "
                           f"{num_layers} layers, choose 1..{num_layers}")


def check_draft_vocabulary(model: EarlyExitModel, draft: EarlyExitModel) -> None:
    """The one draft/target compatibility check of the decoding loops: the same number of real
    tokens (the runner has compared the tokenizers' vocabularies themselves; LM-head padding
    past the tokenizer does not matter, logits are sliced to it)."""
    if draft.vocab_size != model.vocab_size:
        raise LsbenchError(
            f"draft model vocabulary ({draft.vocab_size} tokens) differs from the target's "
            f"({model.vocab_size}); speculative decoding needs one tokenizer")


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise LsbenchError(
            f"unsupported architecture '{model_type}'; early exit needs a decoder-only model "
            f"of type {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


@dataclass
class EvalCounts:
    """Work done by one model: the raw facts the FLOPs accounting is computed from."""

    layer_tokens: list[int]  # per decoder layer: tokens pushed through it
    attn_pairs: list[int]  # per decoder layer: sum over queries of keys attended
    layer_calls: list[int]  # per decoder layer: forward calls (a call may carry many tokens)
    embed_tokens: int = 0
    head_tokens: int = 0  # tokens through final norm + LM head
    head_calls: int = 0  # final norm + LM head calls (each reads the whole head once)

    @classmethod
    def zeros(cls, num_layers: int) -> EvalCounts:
        return cls([0] * num_layers, [0] * num_layers, [0] * num_layers)

    def copy(self) -> EvalCounts:
        return EvalCounts(list(self.layer_tokens), list(self.attn_pairs), list(self.layer_calls),
                          self.embed_tokens, self.head_tokens, self.head_calls)

    def minus(self, other: EvalCounts) -> EvalCounts:
        def diff(a: list[int], b: list[int]) -> list[int]:
            return [x - y for x, y in zip(a, b, strict=True)]

        return EvalCounts(diff(self.layer_tokens, other.layer_tokens),
                          diff(self.attn_pairs, other.attn_pairs),
                          diff(self.layer_calls, other.layer_calls),
                          self.embed_tokens - other.embed_tokens,
                          self.head_tokens - other.head_tokens,
                          self.head_calls - other.head_calls)


class EarlyExitModel:
    """Run any layer range of a decoder-only model against one shared KV cache."""

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None):
        """`vocab_size`: the tokenizer's length when known. LM heads are often padded past it
        (Qwen2.5 0.5B-3B have 151,936 rows, 7B and up 152,064, with one tokenizer): logits are
        sliced to the real tokens, so padded models pair with unpadded ones."""
        check_architecture(model.config)
        self.model = model
        self.config = model.config
        self.backbone = model.model
        self.num_layers: int = self.config.num_hidden_layers
        head_rows = model.lm_head.out_features
        self.vocab_size: int = min(vocab_size or head_rows, head_rows)
        # A model spread over devices (--device-map) runs each module where its weights are.
        self.device = model.lm_head.weight.device  # logits and the decoding loops live here
        self.embed_device = _module_device(self.backbone.embed_tokens)
        self.norm_device = _module_device(self.backbone.norm)
        self.layer_devices = [_module_device(layer) for layer in self.backbone.layers]
        self.rotary_device = _module_device(self.backbone.rotary_emb, self.layer_devices[0])
        self.dtype = model.lm_head.weight.dtype
        # k -> policy.EnginePolicy measured by costs.calibrate (none: lazy head, E/L deferral)
        self.engine_policies: dict = {}
        self.layer_types = self._layer_types()
        window = getattr(self.config, "sliding_window", None)
        self.windows = [window if t == "sliding_attention" else None for t in self.layer_types]
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        params = inspect.signature(self.backbone.layers[0].forward).parameters
        # transformers renamed `past_key_values` to `cache`; accept both spellings.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.counts = EvalCounts.zeros(self.num_layers)
        self.compiled_step: Callable | None = None  # `compile_layers`

    def _layer_types(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types)[: self.num_layers]
        sliding = getattr(self.config, "sliding_window", None)
        return ["sliding_attention" if sliding else "full_attention"] * self.num_layers

    def new_cache(self, batch: int = 1, capacity: int | None = None,
                  pads: list[int] | None = None, max_step: int = 0) -> StaticKVCache:
        """A static cache for `batch` rows (left-padded by `pads`). With a capacity (the
        decoding loops, `kv_cache.capacity_for`) it never reallocates and refuses an overflow;
        without one it starts at one quantum and doubles when full. Every layer keeps all its
        entries (sliding windows are applied by the mask), so any layer can be rolled back
        exactly after a rejected draft. `max_step` > 0: forwards of up to that many tokens run
        through the compiled layer step (`compile_layers`)."""
        if max_step:
            self.compile_layers()
        return StaticKVCache(self.num_layers, batch, capacity or CAPACITY_QUANTUM, pads=pads,
                             device=self.layer_devices[0], grow=capacity is None,
                             max_step=max_step)

    def compile_layers(self, backend: str | Callable = "inductor") -> None:
        """One `torch.compile`d decoder-layer step shared by every layer (their parameters are
        graph inputs), specialised per token count: a sweep over exit layers and k compiles
        once per token count it uses, never per E. On CUDA, CUDA graphs (reduce-overhead).
        Compilation itself happens at a step's first call (the runner's warm-up)."""
        if self.compiled_step is not None:
            return
        # One graph per token count (and per layer kind): more than dynamo's default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        mode = "reduce-overhead" if self.device.type == "cuda" and backend == "inductor" else None
        self.compiled_step = torch.compile(layer_step, backend=backend, mode=mode,
                                           fullgraph=True, dynamic=False)

    @staticmethod
    def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Move a tensor to a module's device (the crossing between devices of a device map)."""
        return tensor if tensor.device == device else tensor.to(device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._to(ids, self.embed_device)
        hidden = self.backbone.embed_tokens(ids)  # Gemma's embedding applies its own scale
        self.counts.embed_tokens += ids.numel()
        return hidden

    def run_layers(self, hidden: torch.Tensor, cache: StaticKVCache, lo: int,
                   hi: int) -> torch.Tensor:
        """Push `hidden` ([B, T, d]: every row's next T positions after layer lo's committed
        entries) through layers [lo, hi), writing their keys and values into `cache`."""
        if lo >= hi:
            return hidden
        rows, n = hidden.shape[:2]
        starts = [length - pad for length, pad in zip(cache.host_lengths[lo], cache.pads,
                                                      strict=True)]
        write_at = cache.begin(lo, n)
        offsets = torch.arange(n, device=write_at.device)
        # [B, T] per row; padding (masked out) gets position 0.
        position_ids = ((write_at - cache.pad_tensor)[:, None] + offsets).clamp_min(0)
        position_ids = self._to(position_ids, self.rotary_device)
        rotary = self.backbone.rotary_emb(self._to(hidden, self.rotary_device),
                                          position_ids=position_ids)
        additive = getattr(self.config, "_attn_implementation", None) == "eager"
        # Per device: positions, rotary embeddings and masks, made once when hidden crosses.
        on_device: dict[torch.device, tuple] = {}
        masks: dict[tuple, torch.Tensor] = {}
        here = None
        for i in range(lo, hi):
            device = self.layer_devices[i]
            if device != here:  # the layer lives on another device: hidden crosses to it
                hidden = self._to(hidden, device)
                here = device
                if device not in on_device:
                    on_device[device] = (self._to(position_ids, device),
                                         tuple(self._to(t, device) for t in rotary))
            positions, embeddings = on_device[device]
            key = (self.windows[i], device)
            if key not in masks:
                masks[key] = attention_mask(cache, lo, n, self.windows[i], hidden.device,
                                            hidden.dtype, additive)
            hidden = self._layer(i, hidden, masks[key], positions, embeddings, cache, write_at)
            self.counts.layer_tokens[i] += rows * n
            self.counts.layer_calls[i] += 1
            # Real queries only: a prefill's padding (negative positions) attends nothing.
            self.counts.attn_pairs[i] += sum(attended_pairs(max(s, 0), n + min(s, 0),
                                                            self.windows[i]) for s in starts)
        cache.advance(lo, hi, n)
        return hidden

    def _layer(self, i: int, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
               embeddings: tuple, cache: StaticKVCache, write_at: torch.Tensor) -> torch.Tensor:
        """Decoder layer i: compiled over the whole capacity for the fixed token counts of
        the decoding steps (`StaticKVCache.static`), eager otherwise (the prefill)."""
        layer = self.backbone.layers[i]
        if not cache.static(hidden.shape[1]):
            return layer(hidden, attention_mask=mask, position_ids=positions,
                         position_embeddings=embeddings, use_cache=True,
                         **{self.cache_kwarg: cache})
        kv_heads = getattr(self.config, "num_key_value_heads", None) or \
            self.config.num_attention_heads
        keys, values = cache.buffers(i, kv_heads, layer.self_attn.head_dim, hidden)
        return self.compiled_step(layer, hidden, mask, positions, *embeddings, keys, values,
                                  self._to(write_at, hidden.device), self.cache_kwarg)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head, applicable after any layer (the early exit); on the head's
        device, sliced to the tokenizer's vocabulary."""
        normed = self.backbone.norm(self._to(hidden, self.norm_device))
        out = self.model.lm_head(self._to(normed, self.device)).float()[..., : self.vocab_size]
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        self.counts.head_tokens += hidden.shape[0] * hidden.shape[1]
        self.counts.head_calls += 1
        return out


def layer_step(layer: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor,
               positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, write_at: torch.Tensor, cache_kwarg: str) -> torch.Tensor:
    """One decoder layer over the static cache's buffers: the compiled region (counting stays
    outside, in `run_layers`)."""
    return layer(hidden, attention_mask=mask, position_ids=positions,
                 position_embeddings=(cos, sin), use_cache=True,
                 **{cache_kwarg: LayerSlot(keys, values, write_at)})


def _module_device(module: torch.nn.Module, default: torch.device | None = None) -> torch.device:
    """Where a module's weights (or, without weights, its buffers) are."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return default if default is not None else torch.device("cpu")


def attended_pairs(start: int, n: int, window: int | None) -> int:
    """Sum over n causal queries at positions start..start+n-1 of the keys each attends."""
    if window is None:
        return n * start + n * (n + 1) // 2
    return sum(min(p + 1, window) for p in range(start, start + n))
