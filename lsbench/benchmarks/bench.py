"""`make bench-engine`: lsbench's engine against transformers' generate() on the embedded
model, measured side by side in one process on the same prompts, printed as ratios.

    python -m lsbench.benchmarks.bench [--prompts 3] [--max-new-tokens 48] [--k 4]
        [--exit-layers 8,16,24,28] [--dtype float32] [--device cpu] [--skip-compiled]

Strategies alternate per prompt (A B, then B A) so slow drift of the machine hits both sides,
and each (strategy, prompt) keeps its fastest repeat: interference from other processes only
ever adds time, so the minimum is the least disturbed measurement. Exit status 1 when a
greedy output differs from autoregressive decoding, else 0.

`pld` (prompt lookup) runs against transformers' `prompt_lookup_num_tokens` at the same k;
both use the same matcher settings, so they verify the same drafts and the ratio measures the
engines. Its line is followed by the rounds, those that drafted nothing (no match, or no budget
left in a last round), and the acceptance.

Each `layerskip` line is followed by a cost model: decoder-layer seconds at 1, k and k+1
tokens and LM-head seconds at 1 and k+1 rows, measured in the same run, put into the per-round
work of both implementations, with and without the deferred last draft. The shared cache saves
compute, not weight reads, so where a (k+1)-token layer call costs little more than a 1-token
call its own ceiling is close to 1; the deferred last draft saves E one-token calls a round.
`engine policy` says which verify head and deferral break-even the measured costs choose;
the engine runs them off the CPU and keeps its default (lazy head, E/L) on the CPU.

The compiled engine (`generate(..., compiled=True)`) is then measured the same way, against
eager decoding and against `hf-ar-compiled` (transformers' generate() with its static cache
and torch.compile), each compiled side compiled in an unmeasured warm-up first:

    compiled ar vs eager ar: 1.23x (target > 1x)
    compiled ar vs hf-ar-compiled: 1.05x (target >= 1.00x; goal 1.20x)
    compiled layerskip vs eager layerskip at E=24 k=4: 1.20x
    ops per decoded token (ar): eager N, compiled M (target M <= N / 5)
    compiled ar roofline: X% of copy bandwidth (target >= 80%)

Ops are the top-level aten operator calls torch.profiler records (an aten op called by another
aten op is not counted again), per decoded token: the difference between two generations of
different lengths, so the prefill cancels. The roofline is the weight bytes the compiled `ar`
read per decode second against the device's copy bandwidth, as in the sweep's roofline column.
Where the compiled engine cannot run (not built, or its compilation fails) those lines say
`compiled engine unavailable: <reason>`, and hf-ar-compiled is still measured against eager ar.
The first line decides lsbench's compile default on the CPU (`COMPILE_ON_CPU` in jobs.py).
Bad input (unknown model, exit layer out of range) ends in one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from lsbench.backend.early_exit import EarlyExitModel, check_exit_layers
from lsbench.backend.loading import LoadedModel, load_model
from lsbench.engine.generation import DecodingConfig, Generation
from lsbench.engine.strategies import generate
from lsbench.errors import LsbenchError, one_line, run_main
from lsbench.scenario.accounting import WeightModel, count_weight_bytes, peak_gbps, roofline
from lsbench.scenario.costs import (  # noqa: F401  (UnitCosts re-exported)
    UnitCosts,
    measure_unit_costs,
    policy_from_unit_costs,
)
from lsbench.scenario.data import DatasetSpec, build_prompt, load_examples
from lsbench.scenario.jobs import parse_int_list
from lsbench.scenario.runner import is_compile_failure, stop_token_ids

AR_TARGET, EXIT_TARGET, PLD_TARGET = 0.97, 1.25, 1.10
TARGETS = {"ar": AR_TARGET, "layerskip": EXIT_TARGET, "pld": PLD_TARGET}
COMPILED_EXIT = 24  # the compiled layerskip line's exit layer, where the model has one
OPS_TOKENS = (4, 12)  # generation lengths whose operator counts are differenced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="lee-news")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-input-tokens", type=int, default=384)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--exit-layers", default="8,16,24,28")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--device", default=None)
    parser.add_argument("--compiled-exit-layer", type=int, default=None,
                        help=f"E of the compiled layerskip line (default {COMPILED_EXIT}, or "
                             "the middle of --exit-layers on a model without it)")
    parser.add_argument("--skip-compiled", action="store_true",
                        help="leave out the compiled engine's lines (gpu-check measures them in "
                        "a step of their own)")
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    _, model, prompts, cfg = load_bench(args.model, args.dtype, args.device, args.dataset,
                                        args.prompts, args.max_input_tokens,
                                        args.max_new_tokens)
    layers = parse_int_list(args.exit_layers, num_layers=model.num_layers)
    check_exit_layers(layers, model.num_layers, args.model)
    compiled_exit = args.compiled_exit_layer or (
        COMPILED_EXIT if model.num_layers > COMPILED_EXIT else layers[(len(layers) - 1) // 2])
    check_exit_layers([compiled_exit], model.num_layers, args.model)
    pairs = [(("ar", None), ("hf-ar", None)), (("pld", None), ("hf-pld", None))]
    pairs += [(("layerskip", e), ("hf-early-exit", e)) for e in layers]

    print(f"{args.model}: {model.num_layers} layers, {len(prompts)} prompts, "
          f"{args.max_new_tokens} new tokens, k={args.k}, {args.repeats} repeats, "
          f"device {model.device}, dtype {model.dtype}")
    reference = {i: generate("ar", model, p, cfg).tokens for i, p in enumerate(prompts)}
    unit = measure_unit_costs(model, prompts[0], args.k)
    ms = 1000.0
    print(f"unit costs: decoder layer {unit.layer_1 * ms:.3f} ms at 1 token, "
          f"{unit.layer_k * ms:.3f} at {args.k}, {unit.layer_k1 * ms:.3f} at {args.k + 1} "
          f"({unit.layer_k1 / unit.layer_1:.2f}x); LM head {unit.head_1 * ms:.2f} ms at 1 row, "
          f"{unit.head_k1 * ms:.2f} ms at {args.k + 1} rows")
    # Off the CPU the engine runs the measured policy (as the runner's warm-up calibrates);
    # on the CPU it keeps its default (lazy head, E/L deferral), so its work is unchanged.
    policy = policy_from_unit_costs(args.k, unit)
    adopted = model.device.type != "cpu"
    if adopted:
        model.engine_policies[args.k] = policy
    print(f"engine policy: {'measured' if adopted else 'default (lazy head, E/L deferral)'}; "
          f"the measured costs choose {policy.describe()}")
    lossless = True
    for a, b in pairs:
        best: dict[tuple, float] = {}  # (strategy, exit, prompt) -> fastest decode seconds
        tokens = {i: 0 for i in range(len(prompts))}
        rounds = {i: 0 for i in range(len(prompts))}  # lsbench's verification rounds
        empty = drafted = accepted = 0  # pld: rounds without a match, drafts, accepted drafts
        for name, e in (a, b):  # warm-up, unmeasured
            generate(name, model, prompts[0], DecodingConfig(max_new_tokens=8), k=args.k,
                     exit_layer=e)
        for repeat in range(args.repeats):
            for i, prompt in enumerate(prompts):
                for name, e in (a, b) if i % 2 == 0 else (b, a):
                    gen = generate(name, model, prompt, cfg, k=args.k, exit_layer=e)
                    key = (name, e, i)
                    best[key] = min(best.get(key, float("inf")), gen.decode_s)
                    tokens[i] = gen.decode_tokens
                    if name in ("layerskip", "pld"):
                        rounds[i] = len(gen.drafted)
                    if name == "pld" and repeat == 0:
                        empty += gen.drafted.count(0)
                        drafted, accepted = drafted + sum(gen.drafted), accepted + sum(gen.accepted)
                    if gen.tokens != reference[i]:
                        lossless = False
                        print(f"  MISMATCH: {name} E={e} differs from ar on prompt {i}")
        tps = {(n, e): sum(tokens.values()) / sum(best[(n, e, i)] for i in tokens)
               for n, e in (a, b)}
        ratio = tps[a] / tps[b]
        target = TARGETS[a[0]]
        where = "" if a[1] is None else f" E={a[1]:<2}"
        verdict = "ok" if ratio >= target else "BELOW TARGET"
        print(f"{a[0]:>9} vs {b[0]:<13}{where}: {tps[a]:6.2f} vs {tps[b]:6.2f} tok/s "
              f"-> {ratio:.2f}x (target >= {target:.2f}x) {verdict}")
        if a[0] == "pld":
            n = sum(rounds.values())
            rate = f"{accepted / drafted:.3f}" if drafted else "—"
            print(f"{'':>16}{n} rounds, {empty} drafted nothing ({empty / max(n, 1):.0%}); "
                  f"acceptance {rate} over the rounds that drafted")
        if a[1] is not None:
            # Greedy drafts and verdicts are the same on both sides, so are the rounds.
            L, e, n = model.num_layers, a[1], sum(rounds.values())
            ours, theirs = (sum(best[(*s, i)] for i in rounds) / n * ms for s in (a, b))
            model_ours = unit.layerskip_round(L, e, args.k) * ms
            model_eager = unit.layerskip_round(L, e, args.k, defer=False) * ms
            model_theirs = unit.hf_early_exit_round(L, e, args.k) * ms
            print(f"{'':>16}per round: {ours:.1f} vs {theirs:.1f} ms; cost model "
                  f"{model_ours:.1f} vs {model_theirs:.1f} ms, a ceiling of "
                  f"{model_theirs / model_ours:.2f}x without generate()'s own overhead "
                  f"({model_theirs / model_eager:.2f}x with the last draft verified eagerly)")
            print(f"{'':>16}deferral break-even: measured "
                  f"{policy.defer_threshold(e, L):.3f}, E/L {e / L:.3f}"
                  f" ({'measured' if adopted else 'E/L'} in use)")
        sys.stdout.flush()
    if not args.skip_compiled:
        lossless &= compiled_lines(model, prompts, cfg, args.k, compiled_exit, args.repeats,
                                   reference)
    print("greedy outputs identical to ar for every strategy:", "yes" if lossless else "NO")
    return 0 if lossless else 1


Config = tuple[str, int | None, bool]  # (strategy, exit layer, compiled)


def load_bench(model_ref: str, dtype: str, device: str, dataset: str, n_prompts: int,
               max_input_tokens: int, max_new_tokens: int
               ) -> tuple[LoadedModel, EarlyExitModel, list[list[int]], DecodingConfig]:
    """The model, its adapter, the prompts of the first `n_prompts` examples and the greedy
    decoding settings (the model's own stop tokens) every side of a benchmark shares."""
    loaded = load_model(model_ref, dtype=dtype, device=device)
    examples, _ = load_examples(DatasetSpec(dataset, limit=n_prompts))
    prompts = [build_prompt(loaded.tokenizer, ex.article, max_input_tokens).ids
               for ex in examples]
    cfg = DecodingConfig(max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids(loaded))
    return loaded, EarlyExitModel(loaded.model), prompts, cfg


def side_by_side(model: EarlyExitModel, prompts: list[list[int]], cfg: DecodingConfig,
                 configs: list[Config], k: int, repeats: int, reference: dict[int, list[int]]
                 ) -> tuple[dict[Config, float], dict[Config, Generation], bool]:
    """Tokens/s of each configuration over all prompts (fastest repeat per prompt), their
    order rotated per prompt; the fastest generation of each on the first prompt; whether
    every output equals `reference`."""
    best: dict[tuple, Generation] = {}
    lossless = True
    for _ in range(repeats):
        for i, prompt in enumerate(prompts):
            shift = i % len(configs)
            for c in configs[shift:] + configs[:shift]:
                gen = generate(c[0], model, prompt, cfg, k=k, exit_layer=c[1], compiled=c[2])
                if (c, i) not in best or gen.decode_s < best[(c, i)].decode_s:
                    best[(c, i)] = gen
                if gen.tokens != reference[i]:
                    lossless = False
                    print(f"  MISMATCH: {_name(c)} differs from ar on prompt {i}")
    tps = {c: sum(best[(c, i)].decode_tokens for i in range(len(prompts)))
           / sum(best[(c, i)].decode_s for i in range(len(prompts))) for c in configs}
    return tps, {c: best[(c, 0)] for c in configs}, lossless


def _name(c: Config) -> str:
    return f"{'compiled' if c[2] else 'eager'} {c[0]}" + (f" E={c[1]}" if c[1] else "")


def _warm(model: EarlyExitModel, prompt: list[int], configs: list[Config], k: int) -> None:
    """One short unmeasured generation per configuration: compilation happens here."""
    for strategy, e, compiled in configs:
        generate(strategy, model, prompt, DecodingConfig(max_new_tokens=8), k=k, exit_layer=e,
                 compiled=compiled)


def ops_per_token(model: EarlyExitModel, prompt: list[int], compiled: bool) -> float:
    """Top-level aten operator calls per decoded token of `ar` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for n in OPS_TOKENS:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            gen = generate("ar", model, prompt, DecodingConfig(max_new_tokens=n),
                           compiled=compiled)
        ops = sum(1 for e in prof.events() if e.name.startswith("aten::")
                  and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
        counts.append((ops, gen.decode_tokens))
    (ops_a, tok_a), (ops_b, tok_b) = counts
    return (ops_b - ops_a) / (tok_b - tok_a)


def compiled_lines(model: EarlyExitModel, prompts: list[list[int]], cfg: DecodingConfig, k: int,
                   exit_layer: int, repeats: int, reference: dict[int, list[int]]) -> bool:
    """The compiled engine's lines (see the module docstring); whether outputs equal ar's."""
    eager_ar, compiled_ar = ("ar", None, False), ("ar", None, True)
    hf_compiled: Config = ("hf-ar-compiled", None, False)  # compiled by transformers
    eager_ls, compiled_ls = ("layerskip", exit_layer, False), ("layerskip", exit_layer, True)
    _warm(model, prompts[0], [eager_ar, hf_compiled, eager_ls], k)
    try:
        _warm(model, prompts[0], [compiled_ar, compiled_ls], k)
        unavailable = ""
    except Exception as exc:  # the engine not built (LsbenchError) or its compilation failed
        if not isinstance(exc, LsbenchError) and not is_compile_failure(exc):
            raise
        unavailable = f"compiled engine unavailable: {one_line(exc, 160)}"
    configs = [eager_ar, hf_compiled] + ([compiled_ar] if not unavailable else [])
    tps, gens, lossless = side_by_side(model, prompts, cfg, configs, k, repeats, reference)
    if unavailable:
        for line in ("compiled ar vs eager ar", "compiled ar vs hf-ar-compiled",
                     f"compiled layerskip vs eager layerskip at E={exit_layer} k={k}",
                     "ops per decoded token (ar)", "compiled ar roofline"):
            print(f"{line}: {unavailable}")
        print(f"{'':>16}(hf-ar-compiled {tps[hf_compiled]:.2f} tok/s, eager ar "
              f"{tps[eager_ar]:.2f} tok/s: eager ar / hf-ar-compiled "
              f"{tps[eager_ar] / tps[hf_compiled]:.2f}x)")
        return lossless
    print(f"compiled ar vs eager ar: {tps[compiled_ar] / tps[eager_ar]:.2f}x (target > 1x)")
    print(f"compiled ar vs hf-ar-compiled: {tps[compiled_ar] / tps[hf_compiled]:.2f}x "
          "(target >= 1.00x; goal 1.20x)")
    ls_tps, _, ls_lossless = side_by_side(model, prompts, cfg, [eager_ls, compiled_ls], k,
                                          repeats, reference)
    print(f"compiled layerskip vs eager layerskip at E={exit_layer} k={k}: "
          f"{ls_tps[compiled_ls] / ls_tps[eager_ls]:.2f}x")
    eager_ops, compiled_ops = (ops_per_token(model, prompts[0], c) for c in (False, True))
    print(f"ops per decoded token (ar): eager {eager_ops:.0f}, compiled {compiled_ops:.0f} "
          f"(target M <= N / 5)")
    gen = gens[compiled_ar]
    weights = count_weight_bytes(WeightModel.from_model(model), gen.decode_counts)
    _, fraction = roofline(weights, gen.decode_s, peak_gbps(str(model.device)))
    print(f"compiled ar roofline: {fraction:.0%} of copy bandwidth (target >= 80%)")
    return lossless and ls_lossless


def run_timed(entry: Callable[[], int]) -> None:
    """A benchmark script's `__main__`: bad input is one line and exit 1; otherwise the
    wall time, then the entry's exit status."""
    t0 = time.perf_counter()

    def timed() -> int:
        code = entry()
        print(f"({time.perf_counter() - t0:.0f} s)")
        return code

    run_main(timed)


if __name__ == "__main__":
    run_timed(main)
