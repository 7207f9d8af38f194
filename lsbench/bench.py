"""`make bench-engine`: lsbench's engine against transformers' generate() on the embedded
model, measured side by side in one process on the same prompts, printed as ratios.

    python -m lsbench.bench [--prompts 3] [--max-new-tokens 48] [--k 4] [--exit-layers 8,16,24,28]

Strategies alternate per prompt (A B, then B A) so slow drift of the machine hits both sides,
and each (strategy, prompt) keeps its fastest repeat: interference from other processes only
ever adds time, so the minimum is the least disturbed measurement. Exit status 1 when a
greedy output differs from autoregressive decoding, else 0.
"""

from __future__ import annotations

import argparse
import sys
import time

from lsbench.data import DatasetSpec, build_prompt, load_examples
from lsbench.models import EarlyExitModel, load_model
from lsbench.runner import stop_token_ids
from lsbench.spec import parse_int_list
from lsbench.strategies import DecodingConfig, generate

AR_TARGET, EXIT_TARGET = 0.97, 1.25


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
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    loaded = load_model(args.model)
    model = EarlyExitModel(loaded.model)
    examples, _ = load_examples(DatasetSpec(args.dataset, limit=args.prompts))
    prompts = [build_prompt(loaded.tokenizer, ex.article, args.max_input_tokens).ids
               for ex in examples]
    cfg = DecodingConfig(max_new_tokens=args.max_new_tokens,
                         stop_token_ids=stop_token_ids(loaded))
    layers = parse_int_list(args.exit_layers, num_layers=model.num_layers)
    pairs = [(("ar", None), ("hf-ar", None))]
    pairs += [(("layerskip", e), ("hf-early-exit", e)) for e in layers]

    print(f"{args.model}: {model.num_layers} layers, {len(prompts)} prompts, "
          f"{args.max_new_tokens} new tokens, k={args.k}, {args.repeats} repeats, "
          f"device {model.device}, dtype {model.dtype}")
    reference = {i: generate("ar", model, p, cfg).tokens for i, p in enumerate(prompts)}
    lossless = True
    for a, b in pairs:
        best: dict[tuple, float] = {}  # (strategy, exit, prompt) -> fastest decode seconds
        tokens = {i: 0 for i in range(len(prompts))}
        for name, e in (a, b):  # warm-up, unmeasured
            generate(name, model, prompts[0], DecodingConfig(max_new_tokens=8), k=args.k,
                     exit_layer=e)
        for _ in range(args.repeats):
            for i, prompt in enumerate(prompts):
                for name, e in (a, b) if i % 2 == 0 else (b, a):
                    gen = generate(name, model, prompt, cfg, k=args.k, exit_layer=e)
                    key = (name, e, i)
                    best[key] = min(best.get(key, float("inf")), gen.decode_s)
                    tokens[i] = gen.decode_tokens
                    if gen.tokens != reference[i]:
                        lossless = False
                        print(f"  MISMATCH: {name} E={e} differs from ar on prompt {i}")
        tps = {(n, e): sum(tokens.values()) / sum(best[(n, e, i)] for i in tokens)
               for n, e in (a, b)}
        ratio = tps[a] / tps[b]
        target = AR_TARGET if a[0] == "ar" else EXIT_TARGET
        where = "" if a[1] is None else f" E={a[1]:<2}"
        verdict = "ok" if ratio >= target else "BELOW TARGET"
        print(f"{a[0]:>9} vs {b[0]:<13}{where}: {tps[a]:6.2f} vs {tps[b]:6.2f} tok/s "
              f"-> {ratio:.2f}x (target >= {target:.2f}x) {verdict}")
        sys.stdout.flush()
    print("greedy outputs identical to ar for every strategy:", "yes" if lossless else "NO")
    return 0 if lossless else 1


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - t0:.0f} s)")
    sys.exit(code)
