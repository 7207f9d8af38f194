"""`python -m lsbench.gpu.check --device cpu --tiny`: the GPU check's dry run, end to end, so
that the script cannot rot before a GPU appears."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from lsbench.errors import LsbenchError
from lsbench.gpu import check as gpucheck

STEP_NAMES = [name for name, _, _ in gpucheck.STEPS]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("gpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        code = gpucheck.main(["--out", str(out), "--device", "cpu", "--tiny",
                              "--budget", "600"])
    return out, code


def steps_of(out: Path) -> dict[str, dict]:
    data = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in data["steps"]] == STEP_NAMES
    return {s["name"]: s for s in data["steps"]}


@pytest.mark.gpucheck
def test_tiny_dry_run_runs_every_step(dry_run):
    out, code = dry_run
    steps = steps_of(out)
    assert code == 0
    for name in ("environment", "tests", "bench", "compiled", "quickstart", "ab"):
        assert steps[name]["status"] == "ok", (name, steps[name]["reason"])
    env = steps["environment"]["details"]
    assert env["peak_gbps"] > 0 and env["device"] == "cpu" and env["tiny"]
    # fp32 exactness on the device passes; bf16 is recorded as raw counts
    tests = steps["tests"]["details"]
    assert tests["float32"]["passed"] > 0 and tests["float32"]["failed"] == 0
    assert tests["bfloat16"]["passed"] + tests["bfloat16"]["failed"] > 0
    for dtype in ("bfloat16", "float32"):
        assert steps["bench"]["details"][dtype]["exit_status"] in (0, 1)
        bench_text = (out / "bench" / f"bench-{dtype}.txt").read_text()
        assert bench_text.count(" vs ") >= 2
        assert "compiled ar vs" not in bench_text  # the compiled step of its own has them
    # step 4: compiled against eager, side by side, with rooflines and operator counts
    compiled = steps["compiled"]["details"]
    assert compiled["dtype"] == "bfloat16" and compiled["compile_s"] > 0
    assert isinstance(compiled["greedy_equal_to_eager_ar"], bool)
    for name in ("ar", "layerskip"):
        r = compiled[name]
        assert r["eager_tokens_per_s"] > 0 and r["compiled_tokens_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["compiled_tokens_per_s"]
                                             / r["eager_tokens_per_s"])
        assert r["eager_roofline"] > 0 and r["compiled_roofline"] > 0
    assert compiled["ops_per_token"]["eager"] > compiled["ops_per_token"]["compiled"] > 0
    quick = steps["quickstart"]["details"]
    assert quick["baseline_roofline_fraction"] > 0
    rows = pd.read_parquet(out / "quickstart" / "quickstart.parquet")
    assert (rows.weight_bytes_read > 0).all() and rows.roofline_fraction.notna().all()
    ab = steps["ab"]["details"]
    assert ab["tokens_per_twin"] > 0 and ab["steps_per_twin"] > 0
    assert set(ab["final_loss_rise"]) == {"baseline", "layerskip"}
    assert set(ab["ab"]["acceptance"]) == {"baseline", "layerskip"}
    # the model's own text joined the training text; no held-out article prompted any of it
    assert ab["self_text"]["tokens"] > 0
    held = [json.loads(line)["article"] for line in
            (out / "ab" / "heldout-news.jsonl").read_text().splitlines()]
    texts = [json.loads(line)["article"] for line in
             (out / "ab" / "self-text.jsonl").read_text().splitlines()]
    assert texts and not any(t[:40] == h[:40] for t in texts for h in held)
    for kind in ("baseline", "layerskip"):
        twin = pd.read_parquet(out / "ab" / f"{kind}.parquet")
        assert set(twin.num_speculations) == {0, 2, 4, 6}
        assert set(twin.exit_layer) == {0, 1, 2, 3, 4}  # every exit layer of the tiny twin
    for figure in [*quick["figures"], *ab["figures"], *steps["scan"]["details"]["figures"]]:
        assert (out / figure).stat().st_size > 0
    # step 7: the all-cpu device map through the same path as the GPU's split, lossless
    devices = steps["devices"]
    assert devices["status"] == "ok", devices["reason"]
    assert not devices["details"]["split"] and "all-cpu" in devices["details"]["label"]
    assert set(devices["details"]["device_map"].values()) == {"cpu"}
    map_file = out / devices["details"]["device_map_file"]
    assert json.loads(map_file.read_text()) == devices["details"]["device_map"]
    mapped = pd.read_parquet(out / "devices" / "devices.parquet")
    assert (mapped.device_map == str(map_file)).all() and mapped.matches_baseline.all()
    assert set(mapped.strategy) == {"ar", "layerskip"} and set(mapped.exit_layer) == {0, 1, 2}
    assert all(r["tokens_per_s"] > 0 and r["lossless"] for r in devices["details"]["runs"])
    # step 8: the LayerSkip twin scanned at every exit layer, k = 1..3, its 3 best verified
    scan = steps["scan"]
    assert scan["status"] == "ok", scan["reason"]
    assert scan["details"]["exit_layers"] == [1, 2, 3, 4] and scan["details"]["ks"] == [1, 2, 3]
    assert scan["details"]["model"] == ab["models"]["layerskip"]
    scanned = pd.read_parquet(out / scan["details"]["scan_file"])
    assert set(scanned.exit_layer[scanned.strategy == "layerskip"]) == {1, 2, 3, 4}
    verified = scan["details"]["verified"]
    assert len(verified) == 3
    for point in verified:  # greedy acceptance is predicted exactly
        assert point["identical rounds"] == "2/2", point
        assert point["predicted acceptance"] == pytest.approx(point["measured acceptance"],
                                                              nan_ok=True)
        assert point["measured speedup"] > 0 and point["predicted speedup"] > 0


@pytest.mark.gpucheck
def test_summary_md_has_a_line_per_step_and_every_section(dry_run):
    out, _ = dry_run
    text = (out / "summary.md").read_text()
    for name in STEP_NAMES:
        assert f"| {name} |" in text
    for section in ("## environment", "## tests", "## bench", "## compiled", "## quickstart",
                    "## ab", "## devices", "## scan", "all-cpu map", "Predicted against measured",
                    "LayerSkip A/B", "Final-layer held-out loss", "Baseline roofline"):
        assert section in text
    assert "![speedup_vs_exit_layer](ab/plots/speedup_vs_exit_layer.png)" in text
    assert "![scan_speedup_heatmap](scan/plots/scan_speedup_heatmap.png)" in text


def test_a_spent_budget_skips_steps_with_reasons_and_still_writes_summaries(tmp_path):
    steps = gpucheck.run_gpucheck(tmp_path, budget=0.5, device="cpu", tiny=True,
                                  say=lambda _m: None)
    assert [s.status for s in steps] == ["skipped"] * len(STEP_NAMES)
    by_name = {s.name: s.reason for s in steps}
    assert by_name["environment"].startswith("out of time")
    assert by_name["tests"].startswith("out of time")
    assert by_name["quickstart"] == "needs the environment step, which did not succeed"
    assert by_name["compiled"] == "needs the environment step, which did not succeed"
    assert by_name["devices"] == "needs the environment step, which did not succeed"
    assert by_name["scan"].startswith("out of time")
    assert steps_of(tmp_path)["ab"]["status"] == "skipped"
    assert (tmp_path / "summary.md").is_file()
    assert not (tmp_path / "tiny-model").exists()  # nothing heavy ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_device_is_refused_in_one_line_without_one(tmp_path):
    with pytest.raises(LsbenchError, match="CUDA is not available"):
        gpucheck.main(["--out", str(tmp_path), "--device", "cuda"])


def test_bad_budget_is_refused(tmp_path):
    with pytest.raises(LsbenchError, match="budget"):
        gpucheck.main(["--out", str(tmp_path), "--budget", "0"])


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure/>'
                   '</testcase><testcase name="c"><skipped/></testcase><testcase name="d">'
                   '<error/></testcase></testsuite></testsuites>')
    counts = gpucheck.junit_counts(xml)
    assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1,
                      "failed_tests": ["b", "d"]}
    assert gpucheck.junit_counts(tmp_path / "missing.xml")["passed"] == 0


def test_device_map_splits_layers_between_cuda_and_cpu():
    split = gpucheck.device_map_for(4, "cuda")
    assert [split[f"model.layers.{i}"] for i in range(4)] == ["cuda:0", "cuda:0", "cpu", "cpu"]
    assert split["model.embed_tokens"] == split["model.rotary_emb"] == "cuda:0"
    assert split["model.norm"] == split["lm_head"] == "cpu"
    assert set(gpucheck.device_map_for(4, "cpu").values()) == {"cpu"}
    assert gpucheck.device_map_for(1, "cuda")["model.layers.0"] == "cuda:0"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_devices_step_on_cuda_splits_the_tiny_model(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("LSBENCH_CACHE", str(tmp_path / "cache"))
    c = gpucheck.Check(out=tmp_path, device="cuda", tiny=True, say=lambda _m: None)
    c.deadline = time.perf_counter() + 300
    step = gpucheck.Step("devices", status="ok")
    gpucheck.step_devices(c, step)
    assert step.status == "ok", step.reason
    assert step.details["split"] and step.details["lossless"]
    assert all(r["tokens_per_s"] > 0 for r in step.details["runs"])
