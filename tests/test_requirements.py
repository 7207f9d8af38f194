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
from lsbench.backend.kv_cache import StaticKVCache, attention_mask
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.hf_reference import neutral_generation_config
from tests.conftest import tiny_model

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


# The engine's mask over a cache whose layer 2 lags layer 0 (verification of deep layers), two
# left-padded rows (pads 0 and 1), 2 new tokens at layer 2: row 0's queries sit at slots 2, 3,
# row 1's at 3, 4 (slot 0 is its padding). Written out by hand, one row of keys per query.
CAUSAL = [[[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]],
          [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]]]
WINDOW_2 = [[[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]],
            [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]]


def _lagging_cache(max_step: int = 0) -> StaticKVCache:
    cache = StaticKVCache(3, batch=2, capacity=8, pads=[0, 1], max_step=max_step)
    cache.host_lengths = [[4, 5], [4, 5], [2, 3]]  # slots taken per layer and row
    cache.lengths = torch.tensor(cache.host_lengths)
    return cache


@pytest.mark.parametrize(("window", "expected"), [(None, CAUSAL), (2, WINDOW_2)])
def test_the_mask_sizes_each_layer_by_its_own_lengths(window, expected):
    """run_layers builds its masks from the static cache's per-layer, per-row lengths (no
    transformers mask builder whose signature could swallow the layer or the cache): a mask
    sized by layer 0's lengths, or blind to a row's padding or to the window, differs."""
    cache = _lagging_cache()
    mask = attention_mask(cache, 2, 2, window, torch.device("cpu"), torch.float32,
                          additive=False)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 2, 5)
    assert mask[:, 0].int().tolist() == expected
    additive = attention_mask(cache, 2, 2, window, torch.device("cpu"), torch.float32,
                              additive=True)
    assert torch.equal(additive == 0, mask)
    assert (additive[~mask] == torch.finfo(torch.float32).min).all()
    # the compiled step's fixed shape: the whole capacity, the unused slots hidden
    static = attention_mask(_lagging_cache(max_step=2), 2, 2, window, torch.device("cpu"),
                            torch.float32, additive=False)
    assert static.shape == (2, 1, 2, 8)
    assert torch.equal(static[..., :5], mask) and not static[..., 5:].any()


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
