"""The compiled engine: one torch.compile'd decoder-layer step over the static KV cache,
shared by every layer and specialised per token count. Greedy output equals the eager
engine's and ar's; a sweep over exit layers and k compiles once per token count, never per
E; a compilation failure is one error line. Compiling on a CPU is slow: few, tiny runs."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from lsbench.backend.early_exit import EarlyExitModel, layer_step
from lsbench.engine.batch import generate_batch
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.strategies import generate
from lsbench.errors import LsbenchError
from tests.conftest import tiny_model
from tests.test_engine import assert_sampling_preserves_the_target_distribution

PROMPT = [1, 5, 9, 17, 33, 4, 60, 12]
CFG = DecodingConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def model() -> EarlyExitModel:
    return EarlyExitModel(tiny_model(seed=0, num_layers=4, dtype=torch.float32))


def test_compiled_greedy_equals_eager_and_ar(model):
    """Every E of the tiny model at k = 1..8 (12 tokens: most k cut the last round short)."""
    ar = generate("ar", model, PROMPT, CFG).tokens
    compiled = generate("ar", model, PROMPT, CFG, compiled=True)
    assert compiled.tokens == ar and compiled.compiled
    assert not generate("ar", model, PROMPT, CFG).compiled
    for k in range(1, 9):
        for e in range(1, model.num_layers + 1):
            gen = generate("layerskip", model, PROMPT, CFG, k=k, exit_layer=e, compiled=True)
            eager = generate("layerskip", model, PROMPT, CFG, k=k, exit_layer=e)
            assert gen.tokens == ar and gen.compiled, (e, k)
            assert (gen.drafted, gen.accepted) == (eager.drafted, eager.accepted)
            assert gen.decode_counts == eager.decode_counts  # counted outside the graph
    assert generate("pld", model, PROMPT + ar, CFG, k=3, compiled=True).tokens == \
        generate("ar", model, PROMPT + ar, CFG).tokens
    draft = EarlyExitModel(tiny_model(seed=7, num_layers=2, dtype=torch.float32))
    assert generate("spec", model, PROMPT, CFG, k=3, draft=draft, compiled=True).tokens == ar
    assert generate("exit", model, PROMPT, CFG, exit_layer=2, compiled=True).tokens == \
        generate("exit", model, PROMPT, CFG, exit_layer=2).tokens


def test_compiled_greedy_stops_on_a_stop_token_inside_a_draft(model):
    """A stop token that ar emits mid-output: drafts that contain it end the run there."""
    stop = generate("ar", model, PROMPT, CFG).tokens[5]
    cfg = DecodingConfig(max_new_tokens=12, stop_token_ids=(stop,))
    ar = generate("ar", model, PROMPT, cfg).tokens
    assert ar[-1] == stop and len(ar) < 12
    stopped_in_draft = False
    for k in (3, 5):
        for e in range(1, model.num_layers + 1):
            gen = generate("layerskip", model, PROMPT, cfg, k=k, exit_layer=e, compiled=True)
            assert gen.tokens == ar, (e, k)
            stopped_in_draft |= gen.accepted[-1] > 0  # the last round accepted drafts
    assert stopped_in_draft


def test_compiled_sampling_preserves_the_target_distribution():
    """The chi-square test of the eager engine (test_engine.py), through the compiled step."""
    assert_sampling_preserves_the_target_distribution(
        DecodingConfig(max_new_tokens=3, do_sample=True, temperature=0.8, top_k=5, top_p=0.95),
        compiled=True)


def test_a_sweep_over_exit_layers_compiles_once_per_token_count(model):
    """Batch 2 is a shape nothing above compiled: the sweep's compilations happen here."""
    prompts = [PROMPT, PROMPT[:5]]

    def sweep() -> int:
        before = counters["stats"]["unique_graphs"]
        for k in (2, 3):
            for e in range(1, model.num_layers + 1):
                out = generate_batch("layerskip", model, prompts, CFG, k=k, exit_layer=e,
                                     compiled=True)
                assert [r.tokens for r in out.rows] == [
                    generate("ar", model, p, CFG).tokens for p in prompts]
        return counters["stats"]["unique_graphs"] - before

    # Token counts 1..k+1 for k in (2, 3): at most 4 graphs for 4 layers x 4 E x 2 k.
    assert 0 < sweep() <= 4
    assert sweep() == 0  # everything reused


def test_a_compilation_failure_is_one_line_naming_no_compile(monkeypatch):
    model = EarlyExitModel(tiny_model(seed=0, num_layers=2, dtype=torch.float32))

    def broken(gm, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    model.compiled_step = torch.compile(layer_step, backend=broken, fullgraph=True)
    with pytest.raises(LsbenchError, match=r"compiling the decoder layers failed .*--no-compile"):
        generate("ar", model, PROMPT, CFG, compiled=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_graphs_equal_eager():
    model = EarlyExitModel(tiny_model(seed=0, num_layers=4, dtype=torch.float32).cuda())
    ar = generate("ar", model, PROMPT, CFG).tokens
    for _ in range(2):  # recording, then replaying the CUDA graphs
        assert generate("ar", model, PROMPT, CFG, compiled=True).tokens == ar
        assert generate("layerskip", model, PROMPT, CFG, k=3, exit_layer=2,
                        compiled=True).tokens == ar
