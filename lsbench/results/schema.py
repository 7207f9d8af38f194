"""The results schema: one row per (example, run, repeat). The single source of truth for
column names, types and meanings; README's schema table is generated from it."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 4  # 3: kv_cache_bytes counts committed tokens, kv_cache_capacity_bytes;
# 4: latency (ttft_s, tpot_s, itl_p*_s and the raw step_end_s, step_tokens), prompt settings
# (n_shot, stop_strings), compiled, compile_s and the engine policy (eager_head,
# defer_threshold, device_loop); batch_size, batch_id, batch_*_s, batch_tokens_per_s,
# peak_gflops
# Columns of older versions that this one no longer has: dropped when such a file is read.
# (Columns an older file lacks are read as nulls.)
REMOVED_COLUMNS = {"peak_mem_bytes", "peak_mem_reserved_bytes"}  # version 1

# What a measurement ran on and with: shared with `lsbench scan`'s files (scan_schema).
ENVIRONMENT_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("lsbench_version", pa.string(), "lsbench version"),
    ("git_commit", pa.string(), "lsbench git commit when available"),
    ("torch_version", pa.string(), "torch version"),
    ("transformers_version", pa.string(), "transformers version"),
    ("device", pa.string(), "torch device"),
    ("device_name", pa.string(), "GPU or CPU model name"),
    ("dtype", pa.string(), "weights dtype"),
    ("threads", pa.int64(), "torch intra-op threads"),
]

# (name, arrow type, meaning)
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    # identity of the run
    ("run_id", pa.string(), "stable hash of everything that defines the run (resume key)"),
    ("sweep_name", pa.string(), "name of the sweep or compare job"),
    ("sweep_file", pa.string(), "sweep file the run came from, empty when none"),
    ("strategy", pa.string(), "ar | spec | layerskip | pld | exit | hf-ar | hf-ar-compiled | "
     "hf-assisted | hf-early-exit | hf-pld"),
    ("is_baseline", pa.bool_(), "true for an autoregressive baseline: ar (lsbench) or hf-ar "
     "(transformers)"),
    ("model", pa.string(), "target model as given (embedded name, hub id, directory, .gguf)"),
    ("model_revision", pa.string(), "hub commit or revision when known"),
    ("model_num_layers", pa.int64(), "decoder layers L of the target"),
    ("model_params", pa.int64(), "parameters of the target"),
    ("draft_model", pa.string(), "draft model for spec/hf-assisted, empty otherwise"),
    ("draft_num_layers", pa.int64(), "decoder layers of the draft model (0 when none)"),
    ("draft_params", pa.int64(), "parameters of the draft model (0 when none)"),
    ("exit_layer", pa.int64(), "early-exit layer E for layerskip/hf-early-exit/exit, 0 otherwise"),
    ("num_speculations", pa.int64(), "draft tokens per round k, 0 for autoregressive and exit"),
    # the engine that ran (null in files of schema version 3 and older)
    ("compiled", pa.bool_(), "true: compiled forwards (lsbench's compiled engine with "
     "--compile, or hf-ar-compiled's torch.compile); false: eager"),
    ("eager_head", pa.bool_(), "lsbench's speculative loops: the verify head computed every "
     "row at once (else lazily, row 0 first); false for other strategies"),
    ("defer_threshold", pa.float64(), "lsbench's speculative loops: the measured break-even "
     "of deferring the last draft; NaN when the E/L rule decided (and for other strategies)"),
    ("device_loop", pa.bool_(), "lsbench's speculative loops: greedy rounds kept on the device "
     "with one transfer per round (CUDA); false otherwise"),
    ("dataset", pa.string(), "dataset name"),
    ("dataset_split", pa.string(), "split (hub datasets)"),
    ("dataset_fingerprint", pa.string(), "hash of the selected examples' text"),
    ("example_id", pa.string(), "stable id of the example within the dataset"),
    ("example_index", pa.int64(), "position of the example in the selection"),
    ("repeat", pa.int64(), "repeat number, 0-based (warm-up runs are never stored)"),
    ("position_in_example", pa.int64(), "0-based place of this run in its (batch, repeat) "
     "unit's measuring order, shuffled with (seed, example_index, repeat) at batch size 1, "
     "(seed, batch_id, repeat, batch_size) above"),
    ("batch_size", pa.int64(), "examples decoded together (static batching): B of "
     "--batch-size; the last batch of a size may hold fewer; null in files of schema version "
     "3 and older (batch 1)"),
    ("batch_id", pa.int64(), "0-based batch of B consecutive examples of the selection the row "
     "was decoded in (at batch size 1 the example index)"),
    ("do_sample", pa.bool_(), "false: greedy; true: sampling"),
    ("temperature", pa.float64(), "sampling temperature"),
    ("top_k", pa.int64(), "top-k filter, 0 off"),
    ("top_p", pa.float64(), "nucleus filter, 1.0 off"),
    ("seed", pa.int64(), "seed of the sampler"),
    ("max_new_tokens", pa.int64(), "generation budget"),
    ("prompt_format", pa.string(), "chat (the tokenizer's chat template), article-summary "
     "('Article: ...\\nSummary:', the LayerSkip benchmark's) or plain (the article alone); "
     "chat-template in files of schema version 3 and older"),
    ("n_shot", pa.int64(), "examples with their reference summaries before the evaluated "
     "article (--n-shot)"),
    ("stop_strings", pa.list_(pa.string()), "--stop texts: output_text is cut at the first; "
     "one-token ones also stop decoding"),
    ("max_input_tokens", pa.int64(), "article token budget before truncation"),
    ("prompt_tokens", pa.int64(), "tokens in the prompt"),
    ("article_truncated", pa.bool_(), "whether the article was cut to max_input_tokens"),
    # raw measurements
    ("output_ids", pa.list_(pa.int64()), "generated token ids"),
    ("output_text", pa.string(), "generated text"),
    ("new_tokens", pa.int64(), "generated tokens"),
    ("decode_tokens", pa.int64(), "tokens emitted after the first (the first comes from prefill)"),
    ("prefill_s", pa.float64(), "seconds from start to the first new token"),
    ("decode_s", pa.float64(), "seconds from the first new token to the last"),
    ("total_s", pa.float64(), "prefill_s + decode_s"),
    ("draft_s", pa.float64(), "seconds spent proposing drafts, part of decode_s (lsbench's "
     "speculative loops; 0 for ar/exit, NaN for transformers' runs)"),
    ("lossy", pa.bool_(), "true for strategies whose output may differ from the full model's by "
     "design (exit); never part of a lossless verdict"),
    ("compile_s", pa.float64(), "compiled runs: wall seconds of the run's first warm-up "
     "generation in this process (compilation, graph capture and one short generation; small "
     "when an earlier run compiled the same graphs), never part of a timed run; 0 for eager"),
    ("batch_prefill_s", pa.float64(), "seconds the row's batch took up to every row's first "
     "new token (prefill_s at batch size 1)"),
    ("batch_decode_s", pa.float64(), "seconds from the batch's first new tokens until its last "
     "row finished (decode_s at batch size 1); a row's own decode_s ends at its last token"),
    ("batch_tokens_per_s", pa.float64(), "aggregate throughput of the row's batch: all its "
     "rows' new_tokens / batch_decode_s (the same in every row of a batch)"),
    ("rounds", pa.int64(), "verification rounds (decode steps for autoregressive)"),
    ("drafted_per_round", pa.list_(pa.int64()), "draft tokens proposed in each round"),
    ("accepted_per_round", pa.list_(pa.int64()), "draft tokens accepted in each round"),
    ("accept_hist", pa.list_(pa.int64()), "rounds with i accepted drafts, i = 0..k"),
    ("rounds_without_draft", pa.int64(), "rounds whose drafter could draft but proposed nothing "
     "(pld without a match; a last round with no budget left is not counted); 0 for "
     "ar/exit, null for transformers' runs"),
    ("layer_tokens_prefill", pa.list_(pa.int64()), "per target layer: tokens evaluated in prefill"),
    ("layer_tokens_decode", pa.list_(pa.int64()), "per target layer: tokens evaluated in decode"),
    ("attn_pairs_prefill", pa.list_(pa.int64()), "per target layer: query-key pairs in prefill"),
    ("attn_pairs_decode", pa.list_(pa.int64()), "per target layer: query-key pairs in decode"),
    ("head_tokens_prefill", pa.int64(), "tokens through final norm + LM head in prefill"),
    ("head_tokens_decode", pa.int64(), "tokens through final norm + LM head in decode"),
    ("draft_layer_tokens_decode", pa.list_(pa.int64()), "per draft-model layer: decode tokens"),
    ("draft_head_tokens_decode", pa.int64(), "draft-model LM head tokens in decode"),
    # derived
    ("tokens_per_s", pa.float64(), "decode_tokens / decode_s"),
    ("e2e_tokens_per_s", pa.float64(), "new_tokens / total_s (prefill included)"),
    ("ms_per_token", pa.float64(), "1000 * decode_s / decode_tokens"),
    ("ttft_s", pa.float64(), "time to first token: prompt to first new token (= prefill_s)"),
    ("tpot_s", pa.float64(), "time per output token after the first: decode_s / "
     "decode_tokens"),
    ("itl_p50_s", pa.float64(), "median inter-token latency: each token's time since the "
     "previous emission, so a step of n tokens gives one gap and n - 1 zeros (README, "
     "Latency); NaN without decode tokens"),
    ("itl_p90_s", pa.float64(), "90th percentile of the same inter-token latencies"),
    ("itl_p99_s", pa.float64(), "99th percentile of the same inter-token latencies"),
    ("step_end_s", pa.list_(pa.float64()), "end of each decode step after the first token "
     "(a round of a speculative loop, a token of ar/exit, a streamer callback of hf-*), in "
     "seconds since the first token: the raw data of tpot_s and itl_*"),
    ("step_tokens", pa.list_(pa.int64()), "tokens each decode step emitted (sums to "
     "decode_tokens)"),
    ("acceptance_rate", pa.float64(), "accepted drafts / drafted tokens (NaN without drafts)"),
    ("mean_accepted_len", pa.float64(), "tokens emitted per round incl. the bonus; 1.0 for AR"),
    ("flops_prefill", pa.float64(), "FLOPs counted for the prompt (per input); at batch "
     "size B the row's share, batch / rows"),
    ("flops_decode", pa.float64(), "FLOPs counted after the first token, target + "
     "draft; at batch size B the row's share, batch / rows"),
    ("flops_per_output_token", pa.float64(), "flops_decode / decode_tokens; at batch "
     "size B the batch's FLOPs / all its rows' decode tokens"),
    ("weight_bytes_read", pa.int64(), "weight bytes read in decode, target + draft: layer calls "
     "x layer bytes + LM-head calls x head bytes + embedded tokens x one embedding row; at "
     "batch size B the row's share, batch bytes / rows of the batch (weights are read once per "
     "step for all rows)"),
    ("achieved_gbps", pa.float64(), "weight bytes read / decode seconds / 1e9 of the row's batch "
     "(the row's own at batch size 1)"),
    ("peak_gbps", pa.float64(), "the device's memory copy bandwidth in GB/s (read + write), "
     "measured once per process: the roofline's memory peak"),
    ("peak_gflops", pa.float64(), "the device's matmul rate in GFLOP/s in the weights' dtype "
     "(a large square matmul), measured once per process: the roofline's compute peak"),
    ("roofline_fraction", pa.float64(), "roofline time / batch_decode_s, the roofline time "
     "being max(batch weight bytes / peak_gbps, batch decode FLOPs / peak_gflops): how close "
     "the batch comes to its bound (at batch 1 achieved_gbps / peak_gbps: weight reads rule)"),
    ("weight_bytes", pa.int64(), "bytes of the weights the strategy uses: target, plus the "
     "draft model where it has one"),
    ("kv_cache_bytes", pa.int64(), "bytes the committed tokens occupy in the KV cache at the "
     "end of the run: keys and values of every layer at its length (the draft model's cache "
     "too; hf-*: the target's cache only); at batch size B the row's own (hf-ar: the batch's "
     "padded cache / rows), the batch's being the sum over its rows"),
    ("kv_cache_capacity_bytes", pa.int64(), "bytes of the KV-cache storage allocated at the "
     "run's peak, over-allocated capacity included (same caches as kv_cache_bytes); null in "
     "files of schema version 2 and older"),
    ("peak_mem_delta_bytes", pa.int64(), "CUDA: peak allocated during the run minus allocated "
     "before it; null on CPU (no allocator statistics)"),
    ("rouge1", pa.float64(), "ROUGE-1 F1 vs the reference (stemmed), NaN without reference"),
    ("rouge2", pa.float64(), "ROUGE-2 F1 vs the reference, NaN without reference"),
    ("rougeL", pa.float64(), "ROUGE-L F1 vs the reference, NaN without reference"),
    ("baseline_strategy", pa.string(), "the baseline this row is compared with: ar for "
     "lsbench's strategies, hf-ar for transformers' (same example, repeat, batch size and "
     "batch composition, and process)"),
    ("baseline_ms_per_token", pa.float64(), "ms_per_token of the baseline on the same example"),
    ("speedup", pa.float64(), "baseline_ms_per_token / ms_per_token (the baseline row of the "
     "same example in the same batch)"),
    ("matches_baseline", pa.bool_(), "output identical to the baseline's (meaningful for greedy); "
     "for ar/hf-ar at batch size B > 1 this and the columns below compare with the batch-1 "
     "baseline of the same example and repeat (null when none was measured)"),
    ("first_mismatch", pa.int64(), "first output position that differs from the baseline's, "
     "-1 when identical (the shorter length when one is a prefix of the other)"),
    ("mismatch_margin", pa.float64(), "float32 logit gap at first_mismatch between the "
     "baseline's and this row's token (top-1 minus top-2 when one output ended), from a "
     "teacher-forced pass of the target over prompt + baseline output; NaN when identical"),
    ("lossless_verdict", pa.string(), "exact, near-tie (margin <= 16 ulps of the dtype at "
     "the logits' magnitude) or MISMATCH; null when sampling or without a baseline"),
    ("agreement", pa.float64(), "share of positions, up to the shorter output, equal to the "
     "baseline's output at the same position"),
    ("draft_revision", pa.string(), "hub commit or revision of the draft model when known"),
    # metadata
    *ENVIRONMENT_COLUMNS,
    ("host", pa.string(), "hostname of the machine that measured the row"),
    ("worker", pa.string(), "Ray worker that measured the row (w<index>-pid<pid>), empty when "
     "lsbench ran in one process"),
    ("device_map", pa.string(), "--device-map (auto, balanced or a JSON file) when the models "
     "were spread over devices, empty otherwise; device is then the LM head's"),
    ("timestamp", pa.string(), "UTC time the row was measured, ISO 8601"),
]

ARROW_SCHEMA = pa.schema([pa.field(name, typ) for name, typ, _ in COLUMNS])
COLUMN_NAMES = [name for name, _, _ in COLUMNS]


def markdown_table() -> str:
    lines = ["| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{n}` | {t} | {d} |" for n, t, d in COLUMNS]
    return "\n".join(lines)
