"""``python -m benchmarks [--quick] [--json PATH] [--only NAME ...]``: the whole suite, one thread."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from benchmarks.common import format_table, single_thread

SUITE = ("butterfly", "binary", "ops", "model", "models", "factorize", "emulated", "gpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run (small sizes, few repeats)")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    parser.add_argument("--only", nargs="+", choices=SUITE, default=list(SUITE))
    args = parser.parse_args(argv)
    single_thread()
    if args.quick:
        args.sizes, args.repeat = [256], 1  # bench_factorize's knobs
    results, rows = {}, []
    for name in args.only:
        print(f"== {name}", file=sys.stderr)
        out = importlib.import_module(f"benchmarks.bench_{name}").run(args)
        results[name] = out
        rows += [r for r in (out if isinstance(out, list) else []) if "times_us" in r]
        for r in out if isinstance(out, list) else []:
            if "skipped" in r:
                print(f"{name}: skipped: {r['skipped']}", file=sys.stderr)
    print(format_table(rows))
    if args.json:
        from frugalrt._atomic import atomic_path

        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
