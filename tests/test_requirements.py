"""The transformers floor in pyproject.toml is the one the code needs (the v5 mask and cache
API), and the installed version satisfies it."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from lsbench.engine.generation import DecodingConfig
from lsbench.engine.hf_reference import neutral_generation_config

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
        assert "layer_idx" in params or "kwargs" in params
    assert "layers" in inspect.signature(Cache.__init__).parameters
    assert hasattr(DynamicLayer, "lazy_initialization") and hasattr(DynamicLayer, "crop")
    # every knob the neutral reference config sets is a real GenerationConfig field
    fields = set(transformers.GenerationConfig().to_dict())
    set_here = {k for k, v in neutral_generation_config(DecodingConfig()).to_dict().items()
                if v is not None}
    assert set_here <= fields
    assert hasattr(transformers.GenerationMixin, "_prepare_generation_config")
