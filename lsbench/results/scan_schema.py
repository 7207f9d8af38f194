"""Columns of `lsbench scan`'s two files (torch-free, so reports and plots can read them).

`<name>.scan.parquet`: one row per (example, strategy, exit layer or draft model, k,
confidence threshold): the replayed rounds and their predicted cost.
`<name>.scan.trace.parquet`: one row per (example, exit layer or draft model): the raw greedy
tokens and top-1 probabilities any other policy can be replayed from without the model.
"""

from __future__ import annotations

import pyarrow as pa

from lsbench.results.schema import ENVIRONMENT_COLUMNS

SCAN_SCHEMA_VERSION = 3  # 3: compiled; 2: host and worker
SCAN_METADATA_KEY = b"lsbench-scan"

_ENV = [
    *ENVIRONMENT_COLUMNS,
    ("host", pa.string(), "hostname of the machine that scanned the example"),
    ("worker", pa.string(), "Ray worker that scanned the example (w<index>-pid<pid>), empty "
     "when the scan ran in one process"),
    ("timestamp", pa.string(), "UTC time the example was scanned, ISO 8601"),
]

_IDENTITY = [
    ("scan_name", pa.string(), "name of the scan (sweep file stem or --name)"),
    ("model", pa.string(), "target model as given"),
    ("model_num_layers", pa.int64(), "decoder layers L of the target"),
    ("dataset", pa.string(), "dataset name"),
    ("dataset_fingerprint", pa.string(), "hash of the selected examples' text"),
    ("example_id", pa.string(), "stable id of the example within the dataset"),
    ("example_index", pa.int64(), "position of the example in the selection"),
    ("max_new_tokens", pa.int64(), "generation budget"),
    ("prompt_tokens", pa.int64(), "tokens in the prompt"),
]

SCAN_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    *_IDENTITY,
    ("strategy", pa.string(), "layerskip | spec | layerskip-conf (confidence-stopped drafts) | "
     "pld (prompt lookup)"),
    ("exit_layer", pa.int64(), "early-exit layer E (0 for spec and pld)"),
    ("draft_model", pa.string(), "draft model for spec, empty otherwise"),
    ("num_speculations", pa.int64(), "most draft tokens per round k"),
    ("confidence_threshold", pa.float64(), "layerskip-conf: drafting stops at the first draft "
     "whose top-1 probability is below it (that draft is dropped); NaN otherwise"),
    ("new_tokens", pa.int64(), "tokens of the greedy autoregressive output replayed"),
    ("predicted_acceptance_rate", pa.float64(), "replayed accepted drafts / drafted tokens"),
    ("predicted_mean_accepted_len", pa.float64(), "replayed tokens emitted per round, incl. "
     "the bonus token"),
    ("predicted_rounds", pa.int64(), "replayed verification rounds"),
    ("predicted_accept_hist", pa.list_(pa.int64()), "replayed rounds with i accepted drafts, "
     "i = 0..k"),
    ("predicted_drafted_per_round", pa.list_(pa.int64()), "replayed drafts per round"),
    ("predicted_accepted_per_round", pa.list_(pa.int64()), "replayed accepted drafts per round"),
    ("predicted_deferred_per_round", pa.list_(pa.bool_()), "layerskip: whether the round "
     "deferred its last draft (the engine's policy, replayed)"),
    ("predicted_offpath_drafts", pa.int64(), "drafts made after a rejected draft, on a prefix "
     "the trace lacks; assumed to run to the budget (only a drafted stop token or a "
     "low-confidence draft there would make the drafted count differ)"),
    ("min_margin", pa.float64(), "smallest top-1 minus top-2 logit gap, at the exit and at the "
     "last layer, over the positions whose verdict the replay used: a near-tie when tiny"),
    ("trace_ar_mismatches", pa.int64(), "positions where the teacher-forced last layer's "
     "argmax differs from the incremental greedy output (floating-point near-ties)"),
    ("compiled", pa.bool_(), "the engine the scan measured its baseline and round overhead "
     "with, and the one --verify times: compiled (--compile) or eager"),
    ("baseline_ms_per_token", pa.float64(), "measured autoregressive decode ms/token, same "
     "example, same process"),
    ("predicted_ar_ms_per_token", pa.float64(), "the cost model's autoregressive ms/token "
     "(equals the baseline up to the step overhead clamp)"),
    ("predicted_ms_per_token", pa.float64(), "replayed rounds priced with the measured unit "
     "costs, as the engine schedules them"),
    ("predicted_speedup", pa.float64(), "baseline_ms_per_token / predicted_ms_per_token"),
    ("cost_table", pa.string(), "JSON of the unit costs (seconds) the rows were priced with"),
    *_ENV,
]

TRACE_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    *_IDENTITY,
    ("source", pa.string(), "exit (an exit layer of the target) or draft (a draft model)"),
    ("exit_layer", pa.int64(), "exit layer E for source exit (L is the full model), else 0"),
    ("draft_model", pa.string(), "draft model for source draft, empty otherwise"),
    ("stop_token_ids", pa.list_(pa.int64()), "stop tokens of the decoding"),
    ("output_ids", pa.list_(pa.int64()), "greedy autoregressive output x"),
    ("argmax", pa.list_(pa.int64()), "per output position j: greedy token after x[j] with the "
     "true prefix (teacher-forced)"),
    ("prob", pa.list_(pa.float32()), "per output position j: its top-1 probability"),
    ("margin", pa.list_(pa.float32()), "per output position j: top-1 minus top-2 logit"),
]


def arrow_schema(columns: list[tuple[str, pa.DataType, str]]) -> pa.Schema:
    return pa.schema([pa.field(name, typ) for name, typ, _ in columns])


def markdown_table(columns: list[tuple[str, pa.DataType, str]]) -> str:
    lines = ["| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{n}` | {t} | {d} |" for n, t, d in columns]
    return "\n".join(lines)
