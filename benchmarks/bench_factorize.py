"""Dense -> butterfly factorization: frugalrt vs pyfaust's ``fact.butterfly``, side by side.

Both run the hierarchical method of Zheng, Riccietti & Gribonval (2023), balanced tree, float64
(complex128 for the DFT), one thread each (threadpoolctl), on the same matrices: Hadamard, a product
of random butterfly factors, the DFT with bit-reversed columns, and a random Gaussian matrix (not a
butterfly: both should report an error near 1). Times are medians of ``--repeat`` runs; the ratio
is pyfaust time / frugalrt time (> 1: frugalrt faster).

    python -m benchmarks.bench_factorize [--sizes 256 1024] [--repeat 3] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Optional

import numpy as np

KINDS = ("hadamard", "random-butterfly", "dft-bitrev", "random-dense")


def make_matrix(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.linalg import hadamard

    from frugalrt.nn.factorize import bit_reversal, butterfly_to_dense

    if kind == "hadamard":
        return hadamard(n).astype(np.float64)
    if kind == "random-butterfly":
        return butterfly_to_dense(rng.standard_normal((n.bit_length() - 1, n // 2, 2, 2)))
    if kind == "dft-bitrev":  # DFT = (butterfly) x (bit-reversal permutation)
        k = np.arange(n)
        return np.exp(-2j * np.pi * np.outer(k, k) / n)[:, bit_reversal(n)]
    if kind == "random-dense":
        return rng.standard_normal((n, n))
    raise ValueError(f"unknown matrix kind {kind!r}; known: {', '.join(KINDS)}")


def relative_error(approx: np.ndarray, matrix: np.ndarray) -> float:
    return float(np.linalg.norm(approx - matrix) / np.linalg.norm(matrix))


def _median_time(fn: Callable[[], np.ndarray], repeat: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _pyfaust() -> tuple[Optional[object], str]:
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pyfaust import fact
        return fact, ""
    except Exception as e:  # ImportError, or a broken native library
        return None, f"pyfaust unavailable ({type(e).__name__}: {e}); install it with `pip install pyfaust`"


def run(args: argparse.Namespace) -> dict:
    """Benchmark rows for every (size, kind); prints the table; returns {"rows": [...], ...}."""
    from threadpoolctl import threadpool_limits

    from frugalrt.nn.factorize import butterfly_to_dense, hierarchical_factorization

    sizes, repeat = getattr(args, "sizes", None) or [256, 1024], getattr(args, "repeat", 3)
    fact, why = _pyfaust()
    if why:
        print(why, file=sys.stderr)
    rng, rows = np.random.default_rng(0), []
    with threadpool_limits(1):
        for n in sizes:
            for kind in KINDS:
                m = make_matrix(kind, n, rng)
                t_ours, tw = _median_time(lambda: hierarchical_factorization(m), repeat)
                row = {"n": n, "matrix": kind, "frugalrt_s": t_ours,
                       "frugalrt_error": relative_error(butterfly_to_dense(tw), m)}
                if fact is not None:
                    mat = m if np.iscomplexobj(m) else np.asfortranarray(m)
                    t_faust, faust = _median_time(lambda: fact.butterfly(mat, type="bbtree"), repeat)
                    row.update(pyfaust_s=t_faust, pyfaust_error=relative_error(faust.toarray(), m),
                               ratio=t_faust / t_ours)
                rows.append(row)
                print(f"  N={n} {kind}: done", file=sys.stderr, flush=True)
    print(table(rows))
    return {"benchmark": "factorize", "threads": 1, "repeat": repeat, "rows": rows, "pyfaust": why or "ok"}


def table(rows: list[dict]) -> str:
    head = f"{'N':>5}  {'matrix':<17}{'frugalrt s':>11}{'error':>10}{'pyfaust s':>11}{'error':>10}{'pyfaust/ours':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        faust = (f"{r['pyfaust_s']:>11.4f}{r['pyfaust_error']:>10.1e}{r['ratio']:>13.2f}x" if "ratio" in r
                 else f"{'n/a':>11}{'n/a':>10}{'n/a':>14}")
        lines.append(f"{r['n']:>5}  {r['matrix']:<17}{r['frugalrt_s']:>11.4f}{r['frugalrt_error']:>10.1e}{faust}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_factorize", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="matrix sizes N (powers of two)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--json", help="also write the results as JSON to this path")
    return p


if __name__ == "__main__":
    from frugalrt._atomic import atomic_path

    args = parser().parse_args()
    result = run(args)
    if args.json:  # (python -m benchmarks writes the whole suite's JSON itself)
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
