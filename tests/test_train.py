"""The LayerSkip recipe against its formulas, the early-exit loss's gradients, layer dropout in
eval mode, and a seeded tiny training run: deterministic, loadable, decodable, nameable."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch

from lsbench.errors import LsbenchError
from lsbench.training.recipe import (
    Recipe,
    dropout_rates,
    enabled_exits,
    exit_forward,
    exit_weights,
    raw_exit_weight,
    time_scale,
    training_forward,
)
from tests.conftest import tiny_model


def test_dropout_rates_grow_exponentially_from_zero_to_p_max():
    rates = dropout_rates(8, 0.2)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    for i, p in enumerate(rates):
        assert p == pytest.approx(0.2 * (2 ** (i / 7) - 1))
    assert all(a < b for a, b in itertools.pairwise(rates))
    assert dropout_rates(8, 0.2, scale=0.5) == pytest.approx([p / 2 for p in rates])
    assert dropout_rates(1, 0.5) == [0.0]


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_time_curricula(t):
    assert time_scale("none", t) == 1.0
    assert time_scale("linear", t) == pytest.approx(t)
    assert time_scale("exp", t) == pytest.approx(math.exp(t * math.log(2)) - 1)
    assert time_scale("exp", 0.0) == 0.0 and time_scale("exp", 1.0) == pytest.approx(1.0)


def test_rotational_curriculum_rotates_every_r_th_exit_and_always_keeps_the_last():
    r2 = Recipe(exit_curriculum="rotational", rotation=2)
    assert enabled_exits(r2, 8, step=0, progress=0) == [2, 4, 6, 8]
    assert enabled_exits(r2, 8, step=1, progress=0) == [1, 3, 5, 7, 8]
    assert enabled_exits(r2, 8, step=2, progress=0) == [2, 4, 6, 8]
    r3 = Recipe(exit_curriculum="rotational", rotation=3)
    seen = set().union(*(enabled_exits(r3, 8, s, 0) for s in range(3)))
    assert seen == set(range(1, 9))
    assert enabled_exits(replace(r2, rotation=1), 8, 5, 0) == list(range(1, 9))


def test_gradual_curriculum_enables_one_exit_per_t_over_2l_from_the_deepest():
    g = Recipe(exit_curriculum="gradual")
    assert enabled_exits(g, 8, 0, progress=0.0) == [8]
    assert enabled_exits(g, 8, 0, progress=1 / 16) == [7, 8]
    assert enabled_exits(g, 8, 0, progress=3 / 16 + 1e-9) == [5, 6, 7, 8]
    assert enabled_exits(g, 8, 0, progress=0.5) == list(range(1, 9))
    assert enabled_exits(g, 8, 0, progress=1.0) == list(range(1, 9))
    assert enabled_exits(Recipe.baseline(), 8, 3, 0.7) == [8]


def test_exit_weights_follow_the_paper_and_normalise_over_enabled_exits():
    e = 0.2
    assert raw_exit_weight(3, 8, e) == pytest.approx(e * (1 + 2 + 3))
    assert raw_exit_weight(8, 8, e) == pytest.approx(8 + e * sum(range(1, 8)))
    w = exit_weights([1, 3, 5, 7, 8], 8, e)
    assert sum(w.values()) == pytest.approx(1.0)
    assert list(w.values()) == sorted(w.values())  # grows with depth
    total = sum(raw_exit_weight(d, 8, e) for d in [1, 3, 5, 7, 8])
    assert w[5] == pytest.approx(raw_exit_weight(5, 8, e) / total)
    assert exit_weights([8], 8, e) == {8: 1.0}
    assert raw_exit_weight(3, 8, e, "l") == pytest.approx(3 * e)
    assert raw_exit_weight(8, 8, e, "l") == 8
    flat = exit_weights([2, 4, 8], 8, 1.0, "one")
    assert flat == pytest.approx({2: 1 / 3, 4: 1 / 3, 8: 1 / 3})


def test_recipe_rejects_bad_knobs():
    with pytest.raises(LsbenchError):
        Recipe(p_max=1.0)
    with pytest.raises(LsbenchError):
        Recipe(exit_curriculum="spiral")
    assert Recipe.baseline().is_baseline and not Recipe().is_baseline


def _ids(vocab: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def test_early_exit_loss_reaches_early_layers_through_the_shared_head():
    model = tiny_model(dtype=torch.float32, num_layers=4).train()
    out = exit_forward(model, _ids(model.config.vocab_size), exits=[1, 4], weights={1: 1.0})
    out.loss.backward()
    grad = {n: p.grad for n, p in model.named_parameters()}
    assert grad["lm_head.weight"].abs().sum() > 0  # the shared head is trained by exit 1
    assert grad["model.norm.weight"].abs().sum() > 0
    assert grad["model.layers.0.mlp.down_proj.weight"].abs().sum() > 0
    assert grad["model.layers.3.mlp.down_proj.weight"] is None  # deeper than the exit


def test_last_exit_loss_is_the_models_own_loss_and_layer_dropout_is_off_in_eval():
    model = tiny_model(dtype=torch.float64, num_layers=4).eval()
    ids = _ids(model.config.vocab_size)
    reference = model(ids, labels=ids).loss
    heavy = [0.9] * 4
    g = torch.Generator().manual_seed(0)
    out = exit_forward(model, ids, exits=[4], rates=heavy, generator=g)
    assert torch.allclose(out.exit_losses[4], reference)
    model.train()
    dropped = exit_forward(model, ids, exits=[4], rates=heavy, generator=g)
    assert not torch.allclose(dropped.exit_losses[4], reference)


def test_training_forward_skips_whole_samples_per_layer():
    model = tiny_model(dtype=torch.float64, num_layers=4).train()
    ids = _ids(model.config.vocab_size, batch=4)
    calls = []
    hook = model.model.layers[3].register_forward_hook(
        lambda _m, args, _out: calls.append(args[0].shape[0]))
    recipe = Recipe(p_max=0.5, exit_curriculum="none")
    g = torch.Generator().manual_seed(0)
    for step in range(8):
        training_forward(model, ids, recipe, step, 0.5, g)
    hook.remove()
    assert calls and min(calls) < 4  # some samples skipped the last layer at p = 0.5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two 20-step runs of the same seeded config (micro Llama, BPE on lee-news)."""
    pytest.importorskip("gensim")
    from lsbench.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(out=str(root / "a"), size="micro", data=("lee-news",), holdout=4,
                      vocab_size=400, tokens=20 * 4 * 64, batch_size=4, seq_len=64,
                      log_every=5, threads=1, device="cpu")
    first = train(cfg)
    second = train(replace(cfg, out=str(root / "b")))
    return cfg, first, second


def test_seeded_training_is_deterministic(trained):
    from safetensors.torch import load_file

    _, first, second = trained
    a = load_file(str(first.path / "model.safetensors"))
    b = load_file(str(second.path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.log["steps"] == 20 and first.log["tokens_seen"] == 20 * 4 * 64
    assert [h["loss"] for h in first.log["history"]] == [h["loss"] for h in second.log["history"]]
    assert first.log["history"][-1]["loss"] < first.log["history"][0]["loss"]


def test_checkpoint_has_log_and_heldout_disjoint_from_training(trained):
    from lsbench.scenario.data import DatasetSpec, load_examples

    cfg, first, _ = trained
    log = json.loads((first.path / "training_log.json").read_text())
    assert set(log["heldout"]["loss"]) == {"1", "2", "3", "4"}
    assert log["config"]["recipe"]["p_max"] == cfg.recipe.p_max
    held = [json.loads(line) for line in (first.path / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 4
    examples, _ = load_examples(DatasetSpec("jsonl:" + str(first.path / "heldout.jsonl"),
                                            limit=4))
    assert len(examples) == 4
    from lsbench.training.train import load_corpus

    corpus = load_corpus(cfg)
    assert not {h["article"] for h in held} & set(corpus.train)


@pytest.mark.parametrize("strategy", ["ar", "layerskip", "spec", "hf-ar", "hf-assisted",
                                      "hf-early-exit"])
def test_checkpoint_loads_and_decodes_with_every_strategy(trained, strategy):
    from lsbench.backend.early_exit import EarlyExitModel
    from lsbench.backend.loading import load_model
    from lsbench.engine.generation import DecodingConfig
    from lsbench.engine.strategies import generate
    from lsbench.scenario.data import build_prompt

    _, first, second = trained
    loaded = load_model(str(first.path), device="cpu")
    assert loaded.model.__class__.__name__ == "LlamaForCausalLM"
    prompt = build_prompt(loaded.tokenizer, "The minister said on Monday that", 32)
    assert prompt.format == "article-summary" and prompt.ids[0] == loaded.tokenizer.bos_token_id
    draft = EarlyExitModel(load_model(str(second.path), device="cpu").model)
    gen = generate(strategy, EarlyExitModel(loaded.model), prompt.ids,
                   DecodingConfig(max_new_tokens=6), k=2, exit_layer=1, draft=draft)
    assert 1 <= len(gen.tokens) <= 6


def test_a_trained_name_resolves_from_the_cache(monkeypatch, tmp_path, trained):
    import shutil

    from lsbench.backend.loading import locate_model, model_num_layers

    monkeypatch.setenv("LSBENCH_CACHE", str(tmp_path))
    with pytest.raises(LsbenchError):
        locate_model("tiny-layerskip-test")
    shutil.copytree(trained[1].path, tmp_path / "trained" / "tiny-layerskip-test")
    source = locate_model("tiny-layerskip-test")
    assert source.kind == "dir" and source.path == tmp_path / "trained" / "tiny-layerskip-test"
    assert model_num_layers("tiny-layerskip-test") == 4


def test_train_config_rejects_inconsistent_options():
    from lsbench.training.train import TrainConfig, output_dir

    with pytest.raises(LsbenchError):
        TrainConfig(out="x", tokens=0)
    with pytest.raises(LsbenchError):
        TrainConfig(out="x", tokenizer="model")
    with pytest.raises(LsbenchError):
        TrainConfig(out="x", init="some/model")  # a pretrained model keeps its tokenizer
    assert output_dir("name").parts[-2:] == ("trained", "name")
    assert str(output_dir("./dir")) == "dir"


def test_ab_end_to_end_on_a_micro_budget(monkeypatch, tmp_path):
    pytest.importorskip("gensim")
    from lsbench.training.ab import run_ab
    from lsbench.training.train import TrainConfig

    monkeypatch.setenv("LSBENCH_CACHE", str(tmp_path / "cache"))
    sweep = tmp_path / "ab.toml"
    sweep.write_text('name = "ab"\nmodel = "tiny-layerskip"\ndevice = "cpu"\nthreads = 1\n'
                     '[data]\nlimit = 2\nmax_input_tokens = 24\n[decoding]\nmax_new_tokens = 6\n'
                     '[sweep]\nexit_layers = "all"\nnum_speculations = [4]\nwarmup = 0\n')
    base = TrainConfig(out="", size="micro", data=("lee-news",), holdout=3, vocab_size=400,
                       tokens=6 * 4 * 64, batch_size=4, seq_len=64, threads=1, device="cpu")
    numbers = run_ab(base, Recipe(), tmp_path / "out", tmp_path / "plots", sweep_file=sweep,
                     parallel=False, say=lambda _m: None)
    assert set(numbers["acceptance"]) == {"baseline", "layerskip"}
    assert set(numbers["acceptance"]["layerskip"]) == {1, 2, 3, 4}
    assert 0 < numbers["distinct_share"]["baseline"] <= 1
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "| 1 |" in text and "Targets" in text
    assert (tmp_path / "plots" / "acceptance_rate_vs_exit_layer.png").is_file()
    assert (tmp_path / "plots" / "tokens_per_s_vs_exit_layer.png").is_file()
    for kind in ("baseline", "layerskip"):
        _check_scan_against_grid(tmp_path / "out", f"tiny-{kind}", numbers["scan"][kind], text)
    assert set(numbers["scan"]["targets"].values()) <= {True, False}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["scan"] == json.loads(
        json.dumps(numbers["scan"]))

    # --skip-train: the same twins are swept and scanned again.
    scan = tmp_path / "out" / "tiny-layerskip.scan.parquet"
    scan.unlink()
    again = run_ab(base, Recipe(), tmp_path / "out", tmp_path / "plots", sweep_file=sweep,
                   train=False, say=lambda _m: None)
    assert scan.is_file() and set(again["scan"]) == {"baseline", "layerskip", "targets"}
    assert again["scan"]["layerskip"]["example_points"] == 2 * 4


def _check_scan_against_grid(out, name: str, check: dict, text: str) -> None:
    """The summary's scan numbers, recomputed here from the sweep and scan files."""
    import statistics

    import pandas as pd

    from lsbench.scenario.scan import trace_path

    scan = pd.read_parquet(out / f"{name}.scan.parquet")
    assert trace_path(out / f"{name}.scan.parquet").is_file()
    runs = pd.read_parquet(out / f"{name}.parquet")
    assert set(scan["strategy"]) == {"layerskip", "layerskip-conf"}  # no prompt lookup
    scan = scan[scan["strategy"] == "layerskip"]
    base = runs[runs["is_baseline"]]
    base_ms = base["decode_s"].sum() / base["decode_tokens"].sum()
    grid = runs[~runs["is_baseline"]]
    assert set(zip(scan["exit_layer"], scan["num_speculations"], strict=True)) == set(
        zip(grid["exit_layer"], grid["num_speculations"], strict=True)) == {
        (e, 4) for e in range(1, 5)}
    measured, predicted, same = {}, {}, 0
    for (e, k), g in grid.groupby(["exit_layer", "num_speculations"]):
        measured[e] = base_ms / (g["decode_s"].sum() / g["decode_tokens"].sum())
        s = scan[(scan["exit_layer"] == e) & (scan["num_speculations"] == k)]
        decode = s["new_tokens"] - 1
        predicted[e] = ((s["baseline_ms_per_token"] * decode).sum()
                        / (s["predicted_ms_per_token"] * decode).sum())
        pred = dict(zip(s["example_id"], s["predicted_accepted_per_round"], strict=True))
        same += sum(list(v) == list(pred[x])
                    for x, v in zip(g["example_id"], g["accepted_per_round"], strict=True))
    assert check["example_points"] == len(grid) == 8 and check["identical_rounds"] == same
    assert check["median_abs_rel_error"] == pytest.approx(
        statistics.median(abs(predicted[e] / measured[e] - 1) for e in measured))
    chosen = max((e for e in predicted if e < 4), key=predicted.get)
    best = max((e for e in measured if e < 4), key=measured.get)
    assert check["best_predicted"]["exit_layer"] == chosen
    assert check["best_measured"]["exit_layer"] == best
    assert check["best_ratio"] == pytest.approx(measured[chosen] / measured[best])
    assert f"E={chosen} k=4 | {predicted[chosen]:.2f}x / {measured[chosen]:.2f}x | " in text
    assert f"E={best} k=4 | {measured[best]:.2f}x | {check['best_ratio']:.3f} |" in text


def test_train_command_writes_a_named_checkpoint(monkeypatch, tmp_path):
    pytest.importorskip("gensim")
    from typer.testing import CliRunner

    from lsbench.cli import app

    monkeypatch.setenv("LSBENCH_CACHE", str(tmp_path))
    args = ["train", "cli-twin", "--recipe", "baseline", "--size", "micro", "--data",
            "lee-news", "--holdout", "2", "--vocab-size", "400", "--tokens", "1024",
            "--batch-size", "2", "--seq-len", "64", "--threads", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    log = json.loads((tmp_path / "trained" / "cli-twin" / "training_log.json").read_text())
    assert log["recipe_name"] == "baseline" and log["steps"] == 8
    bad = CliRunner().invoke(app, ["train", "x", "--recipe", "magic"])
    assert bad.exit_code == 1 and "unknown recipe" in bad.output


def test_continue_from_a_pretrained_model_on_a_wall_clock_budget(tmp_path, tiny_model_dir):
    pytest.importorskip("gensim")
    from lsbench.training.train import TrainConfig, train

    cfg = TrainConfig(out=str(tmp_path / "cont"), init=str(tiny_model_dir), tokenizer="model",
                      data=("lee-news",), tokens=0, time_budget_s=0.5, batch_size=2,
                      seq_len=32, threads=1, device="cpu", log_every=1)
    result = train(cfg)
    assert result.log["steps"] >= 1 and result.log["train_s"] < 5
    assert json.loads((result.path / "config.json").read_text())["vocab_size"] == 84
    assert (result.path / "tokenizer.json").is_file()


def test_twins_differ_in_recipe_only_and_their_settings_take_a_callers_scale(tmp_path):
    """training/ab.py is the one place an A/B is set up: `make ab` and the GPU check both
    name their twins and their scale through it."""
    from lsbench.training.ab import AB_RECIPE, AB_TRAIN, twin_configs, twin_settings
    from lsbench.training.recipe import Recipe

    names = {"baseline": "check-baseline", "layerskip": "check-layerskip"}
    twins = twin_configs(AB_TRAIN, AB_RECIPE, names)
    assert {k: c.out for k, c in twins.items()} == names
    assert twins["baseline"].recipe == Recipe.baseline() and twins["layerskip"].recipe == AB_RECIPE
    assert replace(twins["baseline"], recipe=AB_RECIPE, out="") == replace(
        twins["layerskip"], out="")
    settings = twin_settings("check-layerskip", tmp_path,
                             overrides={("data", "limit"): 2, ("", "device"): "meta"})
    assert settings.get("", "model") == "check-layerskip"
    assert settings.get("data", "dataset") == f"jsonl:{tmp_path / 'heldout-news.jsonl'}"
    assert (settings.get("data", "limit"), settings.get("", "device")) == (2, "meta")
    assert settings.get("decoding", "max_new_tokens") == 64  # the sweep file's, untouched
