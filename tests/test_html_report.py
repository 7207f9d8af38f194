"""`lsbench report --format html|json` on a tiny real sweep: the page is self-contained, its
tables hold the Parquet's values, and it renders in headless Chromium without errors (skipped
where no Chromium is installed); the JSON document parses and matches the Parquet."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lsbench.reporting.html import html_report
from lsbench.reporting.report import JSON_SCHEMA, summarize, sweep_table
from lsbench.results.store import ResultStore, read_results
from tests.test_cli import assert_refused, invoke
from tests.test_report import make_results
from tests.test_runner import write_jsonl
from tests.test_scan_cli import scan_args

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome"))), None)
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-dev-shm-usage", "--hide-scrollbars"]


@pytest.fixture(scope="module")
def swept(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """ar, layerskip at two exits, pld and the lossy exit: every section has rows."""
    tmp = tmp_path_factory.mktemp("html")
    data, out = write_jsonl(tmp / "articles.jsonl"), tmp / "sweep.parquet"
    result = invoke("sweep", "--model", tiny_model_dir, "--dataset", f"jsonl:{data}",
                    "--limit", 2, "-e", "1,3", "-k", 2, "--max-new-tokens", 8, "--warmup", 0,
                    "--strategy", "layerskip", "--strategy", "pld", "--strategy", "exit",
                    "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def scanned(tiny_model_dir: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("scan")
    out = tmp / "tiny.scan.parquet"
    result = invoke(*scan_args(tiny_model_dir, write_jsonl(tmp / "a.jsonl"), out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def page(swept: Path, scanned: Path) -> Path:
    out = swept.parent / "report" / "report.html"
    result = invoke("report", swept, scanned, "--format", "html", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and str(out) in result.stderr
    return out


class Tables(HTMLParser):
    """Tables by id: header names and, per row, each cell's data-value; img sources."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict] = {}
        self.images: list[str] = []
        self.external: list[str] = []
        self.verdict: list[str] = []
        self._table = self._row = None
        self._in_verdict = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), {"cols": [], "rows": []})
        elif tag == "th" and self._table is not None:
            self._table["cols"].append(a["data-col"])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._row.append(a["data-value"])
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "pre" and a.get("id") == "verdict":
            self._in_verdict = True
        for name in ("src", "href"):
            if a.get(name) and not a[name].startswith(("data:", "#")):
                self.external.append(a[name])
        if tag == "link":
            self.external.append(str(a))

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row:
            self._table["rows"].append(self._row)
        if tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "pre":
            self._in_verdict = False

    def handle_data(self, data: str) -> None:
        if self._in_verdict:
            self.verdict.append(data)


def parse(text: str) -> Tables:
    tables = Tables()
    tables.feed(text)
    return tables


def column(tables: Tables, table_id: str, name: str) -> list[str]:
    t = tables.tables[table_id]
    i = t["cols"].index(name)
    return [row[i] for row in t["rows"]]


def as_number(text: str) -> float:
    return math.nan if text == "" else float(text)


def assert_tables_hold_the_parquet(tables: Tables, parquet: Path) -> None:
    """The sweep and summary tables against the rows' own medians; the audit row by row."""
    rows = read_results([parquet])
    medians = rows.groupby("run_id")["tokens_per_s"].median()
    summary = tables.tables["summary-table"]
    assert len(summary["rows"]) == rows["run_id"].nunique()
    run_ids = column(tables, "summary-table", "run_id")
    shown = [as_number(v) for v in column(tables, "summary-table", "tokens_per_s_median")]
    assert shown == [medians[r] for r in run_ids]
    # The sweep table: same runs, tokens/s per (strategy, exit layer) from the rows.
    by_run = rows.groupby(["strategy", "exit_layer"])["tokens_per_s"].median()
    keys = zip(column(tables, "sweep-table", "strategy"),
               column(tables, "sweep-table", "exit layer"), strict=True)
    sweep_tps = [as_number(v) for v in column(tables, "sweep-table", "tokens/s")]
    assert sweep_tps == [by_run[(s, int(e))] for s, e in keys]
    assert column(tables, "sweep-table", "lossy") == [
        "true" if s == "exit" else "false" for s in column(tables, "sweep-table", "strategy")]
    lossy = [v == "true" for v in column(tables, "sweep-table", "lossy")]
    assert [v == "lossy" for v in column(tables, "sweep-table", "verdict")] == lossy
    # The audit: one line per non-baseline row, its first mismatch and margin as stored.
    audit = rows[~rows["is_baseline"]].reset_index(drop=True)
    assert [int(v) for v in column(tables, "audit-table", "first_mismatch")] == \
        audit["first_mismatch"].tolist()
    margins = [as_number(v) for v in column(tables, "audit-table", "mismatch_margin")]
    assert np.array_equal(margins, audit["mismatch_margin"].to_numpy(float), equal_nan=True)
    verdicts = column(tables, "audit-table", "lossless_verdict")
    assert [v == "lossy (not verified)" for v in verdicts] == (audit["strategy"] == "exit").tolist()
    # Every table column the summary builder returns is on the page (latency columns too).
    assert summary["cols"] == [str(c) for c in summarize(rows).columns]
    assert {"ttft_ms", "tpot_ms", "itl_p99_ms"} <= set(summary["cols"])


def test_html_page_is_self_contained_and_holds_the_parquet(page: Path, swept: Path) -> None:
    text = page.read_text(encoding="utf-8")
    tables = parse(text)
    assert tables.external == []
    assert "<script src" not in text and "@import" not in text and "url(" not in text
    assert {"sweep-table", "blog-table", "summary-table", "audit-table", "scan-table",
            "policies-table"} <= set(tables.tables)
    stems = re.findall(r'alt="([^"]+)"', text)
    assert {"tokens_per_s_vs_exit_layer", "speedup_vs_exit_layer",
            "quality_speed_vs_exit_layer", "speedup_by_draft",
            "scan_speedup_heatmap"} <= set(stems)
    for src in tables.images:
        head, _, data = src.partition(",")
        assert head == "data:image/png;base64"
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    for key in ("torch_version", "max_new_tokens", "git_commit", "threads", "device"):
        assert f"<dt>{key}</dt>" in text
    assert "<li>best lossless: " in text and "<li>best lossy: " in text
    assert_tables_hold_the_parquet(tables, swept)


# Recorded from the first line of <head>: errors and console.error calls of the page's own
# scripts; checked on load: every image decoded, every inline SVG drawn, sorting works.
CAPTURE = """<script>window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
window.addEventListener("unhandledrejection", function (e) {
  window.__errors.push("unhandled: " + String(e.reason)); });
(function () { var orig = console.error; console.error = function () {
  window.__errors.push(Array.prototype.join.call(arguments, " "));
  return orig.apply(console, arguments); }; })();
</script>"""
CHECK = """<pre id=verdict></pre><script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var svgs = Array.prototype.slice.call(document.querySelectorAll("svg"));
  var table = document.getElementById("sweep-table"), th = null;
  table.querySelectorAll("th").forEach(function (h) {
    if (h.dataset.col === "tokens/s") { th = h; } });
  var i = Array.prototype.indexOf.call(th.parentNode.children, th);
  th.click();
  var sorted = Array.prototype.map.call(table.tBodies[0].rows, function (r) {
    return Number(r.cells[i].dataset.value); });
  th.click();  // back to descending: the DOM keeps both orders' rows
  var v = {errors: window.__errors, images: imgs.length,
           broken: imgs.filter(function (m) { return !(m.complete && m.naturalWidth > 0); })
                       .map(function (m) { return m.alt; }),
           svgs: svgs.length,
           empty_svgs: svgs.filter(function (s) { var b = s.getBoundingClientRect();
                                                  return !(b.width > 0 && b.height > 0); }).length,
           sorted: sorted, width: document.body.scrollWidth};
  document.getElementById("verdict").textContent = JSON.stringify(v);
});
</script>"""


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (chromium, chromium-browser or "
                    "google-chrome on PATH); .ci/run installs Debian's chromium as root")
def test_html_page_renders_in_headless_chromium(page: Path, swept: Path,
                                                tmp_path: Path) -> None:
    probe = tmp_path / "probe.html"
    text = page.read_text(encoding="utf-8")
    probe.write_text(text.replace("<head>", "<head>" + CAPTURE, 1)
                     .replace("</body>", CHECK + "</body>", 1), encoding="utf-8")
    run = chromium("--dump-dom", "--virtual-time-budget=5000", probe.as_uri(), tmp=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    dom = parse(run.stdout)
    assert dom.verdict, run.stdout[-2000:]
    verdict = json.loads("".join(dom.verdict))
    assert verdict["errors"] == []
    assert verdict["images"] == len(parse(text).images) >= 5 and verdict["broken"] == []
    assert verdict["empty_svgs"] == 0
    finite = [v for v in verdict["sorted"] if not math.isnan(v)]
    assert finite == sorted(finite) and len(finite) == len(verdict["sorted"])
    # The DOM the browser built holds the Parquet's values, as the file does.
    assert_tables_hold_the_parquet(dom, swept)

    shot = tmp_path / "report.png"
    run = chromium(f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri(),
                   tmp=tmp_path)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (4000, 1280)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50  # not blank


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (chromium, chromium-browser or "
                    "google-chrome on PATH); .ci/run installs Debian's chromium as root")
def test_the_browser_check_catches_errors_and_broken_images(page: Path, tmp_path: Path) -> None:
    """The probe above can fail: the same page with a script error, a console.error call and
    an image that does not decode added gets all three reported."""
    broken = tmp_path / "broken.html"
    text = page.read_text(encoding="utf-8")
    bad = ('<img alt="broken" src="data:image/png;base64,AAAA">'
           '<script>console.error("boom"); undefined_function();</script>')
    broken.write_text(text.replace("<head>", "<head>" + CAPTURE, 1)
                      .replace("</body>", bad + CHECK + "</body>", 1), encoding="utf-8")
    run = chromium("--dump-dom", "--virtual-time-budget=5000", broken.as_uri(), tmp=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    verdict = json.loads("".join(parse(run.stdout).verdict))
    assert any("boom" in e for e in verdict["errors"])
    assert any("undefined_function" in e for e in verdict["errors"])
    assert verdict["broken"] == ["broken"]


def test_json_report_matches_the_parquet(swept: Path, scanned: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = invoke("report", swept, "--format", "json", "--out", out)
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text)
    rows = read_results([swept])
    assert doc["schema"] == JSON_SCHEMA == "lsbench-report/1"
    assert list(doc) == ["schema", "lsbench_version", "sources", "settings", "environment",
                         "counts", "warnings", "summary", "sweep", "scan", "policies"]
    assert doc["sources"] == [str(swept)] and doc["scan"] is None
    assert doc["counts"]["rows"] == len(rows)
    assert doc["counts"]["runs"] == rows["run_id"].nunique()
    assert doc["settings"]["max_new_tokens"] == int(rows["max_new_tokens"].iloc[0]) == 8
    assert doc["environment"]["torch_version"] == rows["torch_version"].iloc[0]
    assert doc["environment"]["threads"] == int(rows["threads"].iloc[0])
    medians = rows.groupby("run_id")["tokens_per_s"].median()
    assert [r["tokens_per_s_median"] for r in doc["summary"]] == \
        [medians[r["run_id"]] for r in doc["summary"]]
    assert all(isinstance(r["n"], int) and isinstance(r["lossy"], bool) for r in doc["summary"])
    # The baseline drafts nothing: its acceptance is NaN in the frame and null here.
    base = [r for r in doc["summary"] if r["strategy"] == "ar"]
    assert len(base) == 1 and base[0]["acceptance_rate"] is None
    assert [list(r) for r in doc["sweep"]] == [list(sweep_table(rows).columns)] * len(doc["sweep"])
    exit_rows = [r for r in doc["sweep"] if r["strategy"] == "exit"]
    assert exit_rows and all(r["lossy"] and not r["best"] for r in exit_rows)
    # Scan files add their tables; stdout without --out.
    both = invoke("report", swept, scanned, "--format", "json")
    assert both.exit_code == 0, both.output
    doc = json.loads(both.stdout)
    assert doc["scan"] and doc["policies"] and doc["summary"]
    assert pd.DataFrame(doc["scan"]).shape[0] > 0


def test_html_and_json_refusals(swept: Path, tmp_path: Path) -> None:
    assert_refused(invoke("report", swept, "--format", "html"), "--out")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_refused(invoke("report", swept, "--format", "html", "--out", blocker / "r.html"),
                   "cannot write")
    assert_refused(invoke("report", swept, "--format", "json", "--out", tmp_path),
                   "cannot write")
    assert_refused(invoke("report", swept, "--format", "xml"), "html", "json")
    assert_refused(invoke("report", tmp_path / "missing.parquet", "--format", "html",
                          "--out", tmp_path / "r.html"), "not found")
    empty = tmp_path / "empty.parquet"
    shutil.copy(swept, empty)
    ResultStore(empty).drop_runs(set(read_results([empty])["run_id"]))
    for fmt in ("html", "json"):
        assert_refused(invoke("report", empty, "--format", fmt, "--out", tmp_path / "r.html"),
                       "no rows")
    assert not (tmp_path / "r.html").exists()


def test_scan_files_alone(scanned: Path, tmp_path: Path) -> None:
    out = tmp_path / "scan.html"
    result = invoke("report", scanned, "--format", "html", "--out", out)
    assert result.exit_code == 0, result.output
    tables = parse(out.read_text(encoding="utf-8"))
    assert set(tables.tables) == {"scan-table", "policies-table"} and len(tables.images) == 2
    doc = json.loads(invoke("report", scanned, "--format", "json").stdout)
    assert doc["summary"] is None and doc["settings"] is None and doc["scan"]


def test_blocks_get_their_verdict_lines_and_mismatches_are_marked() -> None:
    df = make_results(exits=(2, 4), ks=(2,), examples=2, repeats=1, spec=False)
    bad = df.index[(df["model"] == "tiny-b") & (df["exit_layer"] == 4)][0]
    df.loc[bad, ["matches_baseline", "first_mismatch", "mismatch_margin",
                 "lossless_verdict"]] = [False, 3, 1.5, "MISMATCH"]
    text = html_report(df, ["synthetic.parquet"])
    headings = re.findall(r"<h3>([^<]+)</h3><ul class=verdicts>(.*?)</ul>", text)
    assert [h for h, _ in headings] == ["tiny-a on lee-news", "tiny-b on lee-news"]
    assert all("<li>best lossless: " in lines for _, lines in headings)
    audit = parse(text).tables["audit-table"]
    assert len(audit["rows"]) == (~df["is_baseline"]).sum()
    marked = re.findall(r"<tr class='mismatch'>(.*?)</tr>", text)
    assert len(marked) == 1 and 'data-value="1.5"' in marked[0] and 'data-value="3"' in marked[0]
