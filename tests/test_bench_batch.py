"""`make bench-batch`'s script, smoke-tested on the tiny saved model (SmolLM2 is its real
target: minutes on this CPU)."""

from __future__ import annotations

import re
from pathlib import Path

from lsbench.benchmarks.bench_batch import main
from tests.test_runner import write_jsonl


def test_bench_batch_prints_a_line_per_batch_size_and_the_crossovers(
        tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "a.jsonl")
    assert main(["--model", str(tiny_model_dir), "--dataset", f"jsonl:{data}",
                 "--examples", "4", "--max-new-tokens", "6", "--batch-sizes", "1,2",
                 "-k", "2", "--dtype", "float64", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    batch = [x for x in lines if x.startswith("batch ")]
    pattern = (r"batch {b}: ar [\d.]+ tok/s aggregate \({x}x batch 1\), pld k=2 [\d.]+x, "
               r"layerskip E=3 k=2 [\d.]+x; scan predicted [\d.]+x / [\d.]+x")
    assert re.fullmatch(pattern.format(b=1, x="1.00"), batch[0]), batch[0]
    assert re.fullmatch(pattern.format(b=2, x=r"[\d.]+"), batch[1]), batch[1]
    cross = [x for x in lines if x.startswith("crossover: ")]
    assert len(cross) == 2
    assert re.fullmatch(r"crossover: pld k=2 at (batch \d|none) \(predicted (batch \d|none)\)"
                        r"( \(none: slower than ar at every batch size\))?", cross[0]), cross[0]
    assert cross[1].startswith("crossover: layerskip E=3 k=2 at ")
