"""run_job with prompt lookup (pld, hf-pld) and the lossy early exit on the tiny saved model:
the new columns (draft_s, lossy, rounds_without_draft) are present and consistent."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from lsbench.results.schema import COLUMN_NAMES
from lsbench.results.store import ResultStore
from lsbench.scenario.jobs import RunSpec, sweep_job
from lsbench.scenario.quality import agreement, first_mismatch
from lsbench.scenario.runner import run_job
from tests.test_runner import job_settings, write_jsonl


@pytest.fixture(scope="module")
def rows(tiny_model_dir: Path, tmp_path_factory) -> pd.DataFrame:
    data = write_jsonl(tmp_path_factory.mktemp("data") / "articles.jsonl")
    job = sweep_job(job_settings(tiny_model_dir, data, data__limit=3,
                                 decoding__max_new_tokens=16, sweep__exit_layers="1,4",
                                 sweep__num_speculations="2,4",
                                 sweep__strategies=["layerskip", "pld", "hf-pld", "exit"]), 4)
    assert RunSpec("exit", 1, 0) in job.runs and RunSpec("pld", 0, 4) in job.runs
    store = ResultStore(tmp_path_factory.mktemp("results") / "sweep.parquet")
    run_job(job, store)
    return ResultStore(store.path).rows()


def test_new_columns_sit_at_their_anchors():
    names = COLUMN_NAMES
    assert names[names.index("accept_hist") + 1] == "rounds_without_draft"
    assert names[names.index("total_s") + 1: names.index("total_s") + 3] == ["draft_s", "lossy"]


def test_pld_rows_are_lossless_and_count_rounds_without_a_match(rows):
    pld = rows[rows.strategy == "pld"]
    assert len(pld) == 2 * 3 and pld.matches_baseline.all() and (pld.first_mismatch == -1).all()
    assert not pld.lossy.any() and (pld.exit_layer == 0).all()
    drafted = [list(d) for d in pld.drafted_per_round]
    # A last round one token short of the budget cannot draft: not a round without a match.
    no_budget = [d[-1] == 0 and n == r.max_new_tokens
                 for d, n, r in zip(drafted, pld.new_tokens, pld.itertuples(), strict=True)]
    assert list(pld.rounds_without_draft) == [d.count(0) - nb
                                              for d, nb in zip(drafted, no_budget, strict=True)]
    assert list(pld.rounds) == [len(d) for d in drafted]
    assert sum(pld.rounds_without_draft) > 0 and sum(sum(d) for d in drafted) > 0
    # Acceptance counts only rounds that drafted; emitted tokens count every round.
    for r in pld.itertuples():
        accepted = list(r.accepted_per_round)
        if sum(r.drafted_per_round):
            assert r.acceptance_rate == pytest.approx(sum(accepted) / sum(r.drafted_per_round))
        assert r.decode_tokens in (sum(accepted) + r.rounds, sum(accepted) + r.rounds - 1)
        assert sum(r.accept_hist) == r.rounds
    # Drafting costs no model work: every decode layer sees exactly the verified tokens.
    for r in pld.itertuples():
        verified = sum(d + 1 for d in r.drafted_per_round)
        assert list(r.layer_tokens_decode) == [verified] * 4
        assert list(r.draft_layer_tokens_decode) == [] and r.draft_head_tokens_decode == 0


def test_draft_s_is_measured_where_lsbench_drafts(rows):
    spec = rows[rows.strategy.isin(["pld", "layerskip"])]
    assert (spec.draft_s > 0).all() and (spec.draft_s < spec.decode_s).all()
    own = rows[rows.strategy.isin(["ar", "exit"])]
    assert (own.draft_s == 0).all() and (own.rounds_without_draft == 0).all()
    # layerskip always drafts while it has budget: a last round without one is not counted
    layerskip = rows[rows.strategy == "layerskip"]
    assert any(list(d)[-1] == 0 for d in layerskip.drafted_per_round)
    assert (layerskip.rounds_without_draft == 0).all()
    hf = rows[rows.strategy == "hf-pld"]
    assert len(hf) == 2 * 3 and hf.draft_s.isna().all() and hf.rounds_without_draft.isna().all()
    assert hf.matches_baseline.all() and not hf.lossy.any()


def test_exit_rows_are_lossy_and_compared_with_the_baseline(rows):
    ex = rows[rows.strategy == "exit"]
    assert len(ex) == 2 * 3 and ex.lossy.all() and (rows.lossy == (rows.strategy == "exit")).all()
    assert (ex.num_speculations == 0).all() and set(ex.exit_layer) == {1, 4}
    base = {r.example_id: list(r.output_ids) for r in rows[rows.is_baseline].itertuples()}
    for r in ex.itertuples():
        ids = list(r.output_ids)
        assert r.matches_baseline == (ids == base[r.example_id])
        assert r.first_mismatch == first_mismatch(ids, base[r.example_id])
        assert r.agreement == pytest.approx(agreement(ids, base[r.example_id]))
        assert r.rounds == r.decode_tokens and math.isnan(r.acceptance_rate)
        # Prefill and decode run only layers [0, E); the full model at E = L.
        e = r.exit_layer
        assert list(r.layer_tokens_prefill) == [r.prompt_tokens] * e + [0] * (4 - e)
        assert list(r.layer_tokens_decode) == [r.decode_tokens] * e + [0] * (4 - e)
    assert ex[ex.exit_layer == 4].matches_baseline.all()
    shallow = ex[ex.exit_layer == 1]
    assert not shallow.matches_baseline.all()  # lossy for real on the random tiny model
    assert (shallow.flops_per_output_token < ex[ex.exit_layer == 4].flops_per_output_token
            .median()).all()
