"""`make bench-engine`: lsbench's engine against transformers' generate() on the embedded
model, measured side by side in one process on the same prompts, printed as ratios.

    python -m lsbench.benchmarks.bench [--prompts 3] [--max-new-tokens 48] [--k 4]
        [--exit-layers 8,16,24,28] [--dtype float32] [--device cpu]

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
Bad input (unknown model, exit layer out of range) ends in one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from lsbench.backend.early_exit import EarlyExitModel, check_exit_layers
from lsbench.backend.loading import load_model
from lsbench.engine.generation import DecodingConfig
from lsbench.engine.strategies import generate
from lsbench.errors import run_main
from lsbench.scenario.costs import (  # noqa: F401  (UnitCosts re-exported)
    UnitCosts,
    measure_unit_costs,
    policy_from_unit_costs,
)
from lsbench.scenario.data import DatasetSpec, build_prompt, load_examples
from lsbench.scenario.jobs import parse_int_list
from lsbench.scenario.runner import stop_token_ids

AR_TARGET, EXIT_TARGET, PLD_TARGET = 0.97, 1.25, 1.10
TARGETS = {"ar": AR_TARGET, "layerskip": EXIT_TARGET, "pld": PLD_TARGET}


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
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    model = EarlyExitModel(loaded.model)
    examples, _ = load_examples(DatasetSpec(args.dataset, limit=args.prompts))
    prompts = [build_prompt(loaded.tokenizer, ex.article, args.max_input_tokens).ids
               for ex in examples]
    cfg = DecodingConfig(max_new_tokens=args.max_new_tokens,
                         stop_token_ids=stop_token_ids(loaded))
    layers = parse_int_list(args.exit_layers, num_layers=model.num_layers)
    check_exit_layers(layers, model.num_layers, args.model)
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
    print("greedy outputs identical to ar for every strategy:", "yes" if lossless else "NO")
    return 0 if lossless else 1


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
