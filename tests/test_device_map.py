"""--device-map: models loaded across devices by accelerate; the early-exit adapter runs each
layer on its own device, moving hidden states as they cross."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.backend.loading import load_model, parse_device_map
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.strategies import generate
from lsbench.errors import LsbenchError
from tests.test_cli import invoke, sweep_args
from tests.test_runner import write_jsonl

PROMPT = [1, 5, 9, 12, 7, 30, 4]
CFG = DecodingConfig(max_new_tokens=12)


def write_map(path: Path, layers: list[str], rest: str = "cpu", first: str = "cpu") -> Path:
    """A map file: embeddings and rotary on `first`, layer i on layers[i], norm + head on
    `rest`."""
    mapping = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": rest,
               "lm_head": rest, **{f"model.layers.{i}": d for i, d in enumerate(layers)}}
    path.write_text(json.dumps(mapping))
    return path


def test_parse_device_map_refusals(tmp_path: Path) -> None:
    assert parse_device_map("auto") == "auto" and parse_device_map("balanced") == "balanced"
    good = write_map(tmp_path / "m.json", ["cpu"] * 4)
    assert parse_device_map(str(good))["model.layers.3"] == "cpu"
    (tmp_path / "bad.json").write_text("[1, 2]")
    (tmp_path / "disk.json").write_text('{"model": "disk"}')
    (tmp_path / "typo.json").write_text('{"model": "gpu7"}')
    for text, message in [("everywhere", "must be auto, balanced or a .json file"),
                          (str(tmp_path / "missing.json"), "cannot read device map"),
                          (str(tmp_path / "bad.json"), "JSON object of module name"),
                          (str(tmp_path / "disk.json"), "offloads to disk"),
                          (str(tmp_path / "typo.json"), "unknown device 'gpu7'")]:
        with pytest.raises(LsbenchError, match=message):
            parse_device_map(text)


def test_all_cpu_map_goes_through_accelerate_and_decodes_the_same(tiny_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    plain = load_model(str(tiny_model_dir), dtype="float64", device="cpu")
    mapped = load_model(str(tiny_model_dir), dtype="float64", device="cpu",
                        device_map=str(write_map(tmp_path / "m.json", ["cpu"] * 4)))
    a, b = EarlyExitModel(plain.model), EarlyExitModel(mapped.model)
    assert b.layer_devices == [torch.device("cpu")] * 4
    for strategy, exit_layer in (("ar", None), ("layerskip", 2)):
        want = generate(strategy, a, PROMPT, CFG, k=3, exit_layer=exit_layer).tokens
        assert generate(strategy, b, PROMPT, CFG, k=3, exit_layer=exit_layer).tokens == want


def test_hidden_states_cross_once_per_device_boundary(target: EarlyExitModel,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers 0-1 on one device, 2-3 on another (a fake one: moves are recorded, not made)."""
    cpu, other = torch.device("cpu"), torch.device("meta")
    ids = torch.tensor([PROMPT])
    reference = target.logits(target.run_layers(target.embed(ids), target.new_cache(), 0, 4))
    moves: list[tuple[str, torch.Size, torch.device]] = []
    hidden_size = target.config.hidden_size

    def record(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        kind = "hidden" if tensor.shape[-1] == hidden_size and tensor.dim() == 3 else "other"
        moves.append((kind, tensor.shape, device))
        return tensor

    monkeypatch.setattr(target, "_to", record)
    monkeypatch.setattr(target, "layer_devices", [cpu, cpu, other, other])
    monkeypatch.setattr(target, "norm_device", other)
    logits = target.logits(target.run_layers(target.embed(ids), target.new_cache(), 0, 4))
    torch.testing.assert_close(logits, reference)
    hidden_moves = [d for kind, _, d in moves if kind == "hidden"]
    # rotary input, layer 0 (cpu), layer 2 crosses to `other`, norm (other), head (cpu)
    assert hidden_moves == [cpu, cpu, other, other, cpu]
    # positions, cos and sin are moved once per device, not once per layer
    assert sum(1 for kind, _, d in moves if kind == "other" and d == other) == 3
    moves.clear()
    target.run_layers(target.embed(ids), target.new_cache(), 2, 4)  # starts on `other`
    assert [d for kind, _, d in moves if kind == "hidden"] == [cpu, other]


def test_sweep_with_a_device_map_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "a.jsonl")
    out = tmp_path / "r.parquet"
    mapping = write_map(tmp_path / "m.json", ["cpu"] * 4)
    result = invoke(*sweep_args(tiny_model_dir, data, out, "--device-map", mapping))
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(out)
    assert (df.device_map == str(mapping)).all() and df.matches_baseline.all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layers_split_between_cuda_and_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    cuda, cpu = torch.device("cuda:0"), torch.device("cpu")
    plain = EarlyExitModel(load_model(str(tiny_model_dir), dtype="float64", device="cpu").model)
    split = write_map(tmp_path / "m.json", ["cuda:0", "cuda:0", "cpu", "cpu"], rest="cpu",
                      first="cuda:0")
    model = EarlyExitModel(load_model(str(tiny_model_dir), dtype="float64", device="cpu",
                                      device_map=str(split)).model)
    assert model.layer_devices == [cuda, cuda, cpu, cpu] and model.device == cpu
    cache = model.new_cache()
    hidden = model.run_layers(model.embed(torch.tensor([PROMPT])), cache, 0, 4)
    assert [layer.keys.device for layer in cache.layers] == [cuda, cuda, cpu, cpu]
    assert model.logits(hidden).device == cpu
    for strategy, exit_layer in (("ar", None), ("layerskip", 1), ("layerskip", 3)):
        want = generate(strategy, plain, PROMPT, CFG, k=3, exit_layer=exit_layer).tokens
        assert generate(strategy, model, PROMPT, CFG, k=3, exit_layer=exit_layer).tokens == want
