"""The transformers floor in pyproject.toml is the one the code needs (the v5 mask and cache
API), and the installed version satisfies it."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from lsbench.backend.early_exit import EarlyExitModel
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.hf_reference import neutral_generation_config
from tests.conftest import tiny_config, tiny_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _requirement(name: str) -> Requirement:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == name]
    return req


def test_installed_transformers_satisfies_the_floor_and_the_floor_is_v5():
    spec = _requirement("transformers").specifier
    assert spec.contains(Version(transformers.__version__), prereleases=True)
    floors = [Version(s.version) for s in spec if s.operator in (">=", ">")]
    assert floors and min(floors) >= Version("5.0")
    assert not spec.contains("4.57.0")


def test_the_transformers_api_lsbench_uses_exists():
    from transformers.cache_utils import Cache, DynamicLayer
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    for make in (create_causal_mask, create_sliding_window_causal_mask):
        params = inspect.signature(make).parameters
        assert {"config", "inputs_embeds", "attention_mask", "position_ids"} <= set(params)
    assert "layers" in inspect.signature(Cache.__init__).parameters
    assert hasattr(DynamicLayer, "lazy_initialization") and hasattr(DynamicLayer, "crop")
    # every knob the neutral reference config sets is a real GenerationConfig field
    fields = set(transformers.GenerationConfig().to_dict())
    set_here = {k for k, v in neutral_generation_config(DecodingConfig()).to_dict().items()
                if v is not None}
    assert set_here <= fields
    assert hasattr(transformers.GenerationMixin, "_prepare_generation_config")


def _cache_with_lengths(config, lengths: list[int]):
    """A DynamicCache whose layer i holds lengths[i] entries (deep layers lag behind)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=config)
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    for i, n in enumerate(lengths):
        cache.update(torch.zeros(1, heads, n, dim), torch.zeros(1, heads, n, dim), i)
    return cache


@pytest.mark.parametrize("window", [None, 3])
def test_the_installed_mask_builders_size_each_layer_by_its_own_cache(window):
    """run_layers passes layer_idx and the cache to transformers' mask builders: a builder
    that swallowed either (a **kwargs signature) would size the mask by layer 0 or by no
    cache at all. Layer 2 holds 2 entries, layer 0 holds 5; 3 new tokens at positions 2..4."""
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
    )

    config = tiny_config(num_layers=3, sliding_window=window)
    config._attn_implementation = "eager"  # a materialized additive mask, comparable as is
    make = create_causal_mask if window is None else create_sliding_window_causal_mask
    hidden = torch.zeros(1, 3, config.hidden_size)
    positions = torch.arange(2, 5).unsqueeze(0)
    mask = make(config=config, inputs_embeds=hidden, attention_mask=None,
                position_ids=positions, layer_idx=2, cache=_cache_with_lengths(config, [5, 5, 2]))
    q = positions[0, :, None]
    k = torch.arange(5)[None, :]
    allowed = (k <= q) & ((q - k < window) if window else True)
    assert mask is not None and mask.shape[-2:] == (3, 5)
    assert torch.equal(mask[0, 0] == 0, allowed)


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
def test_verifying_deep_layers_over_pending_tokens_equals_a_full_forward(exit_layer):
    """Self-speculation's verification: layers E..L-1 run over drafted tokens while their
    cache holds only the committed prefix (the shallow layers already hold the drafts). Their
    output must equal a plain forward of the model over prefix + drafts."""
    model = tiny_model(seed=5, num_layers=4)  # float64: equal up to rounding
    adapter = EarlyExitModel(model)
    prefix, drafts = [1, 7, 9, 12, 4, 30], [17, 22, 8]
    cache = adapter.new_cache()
    with torch.inference_mode():
        adapter.run_layers(adapter.embed(torch.tensor([prefix])), cache, 0, adapter.num_layers)
        shallow = adapter.run_layers(adapter.embed(torch.tensor([drafts])), cache, 0,
                                     exit_layer)
        assert [cache.get_seq_length(i) for i in (0, exit_layer)] == [
            len(prefix) + len(drafts), len(prefix)]
        deep = adapter.run_layers(shallow, cache, exit_layer, adapter.num_layers)
        full = model(torch.tensor([prefix + drafts]), output_hidden_states=True).hidden_states
    n = len(drafts)
    torch.testing.assert_close(shallow, full[exit_layer][:, -n:])
    # transformers' last hidden state is after the final norm
    torch.testing.assert_close(adapter.backbone.norm(deep), full[-1][:, -n:])
