"""Dense -> butterfly factorization: frugalrt (left-to-right, orthonormal) vs its old balanced tree and pyfaust.

All float64 (complex128 for the DFT), one thread each (threadpoolctl), on the same matrices: Hadamard,
a product of random butterfly factors, the DFT with bit-reversed columns, a random Gaussian matrix
(not a butterfly: all should report an error near 1), and a random butterfly plus 1% noise, square and
as a (3N/5) x (39N/40) block (zero-padded to N x N for every method; the error is on the block). For
the noisy rows the clean butterfly is the best known approximation (error 1.0e-2); the optimum is
about 1e-2 * sqrt(1 - N (log2 N + 1) / (out * in)). pyfaust's ``fact.butterfly`` runs its balanced tree
(``type="bbtree"``). Times are medians of ``--repeat`` runs; the ratio is pyfaust time / frugalrt
time (> 1: frugalrt faster).

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

KINDS = ("hadamard", "random-butterfly", "dft-bitrev", "random-dense", "noisy-butterfly", "noisy-block")
NOISE = 1e-2


def make_matrix(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """The ``kind`` matrix for size N: N x N, except ``noisy-block`` ((3N/5) x (39N/40))."""
    from scipy.linalg import hadamard

    from frugalrt.nn.factorize import bit_reversal, butterfly_to_dense

    if kind == "hadamard":
        return hadamard(n).astype(np.float64)
    if kind in ("random-butterfly", "noisy-butterfly", "noisy-block"):
        m = butterfly_to_dense(rng.standard_normal((n.bit_length() - 1, n // 2, 2, 2)))
        if kind == "random-butterfly":
            return m
        if kind == "noisy-block":
            m = m[: 3 * n // 5, : n - n // 40]
        e = rng.standard_normal(m.shape)
        return m + NOISE * np.linalg.norm(m) * e / np.linalg.norm(e)
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
                out, inp = m.shape
                padded = np.zeros((n, n), dtype=m.dtype)
                padded[:out, :inp] = m
                block = lambda tw: butterfly_to_dense(tw, (out, inp))  # noqa: E731
                t_ours, tw = _median_time(lambda: hierarchical_factorization(padded), repeat)
                t_bal, tw_bal = _median_time(lambda: hierarchical_factorization(padded, "balanced"), repeat)
                row = {"n": n, "matrix": kind, "shape": [out, inp], "frugalrt_s": t_ours,
                       "frugalrt_error": relative_error(block(tw), m), "balanced_s": t_bal,
                       "balanced_error": relative_error(block(tw_bal), m)}
                if kind.startswith("noisy"):
                    row["clean_error"] = NOISE
                if fact is not None:
                    mat = padded if np.iscomplexobj(padded) else np.asfortranarray(padded)
                    t_faust, faust = _median_time(lambda: fact.butterfly(mat, type="bbtree"), repeat)
                    row.update(pyfaust_s=t_faust, pyfaust_error=relative_error(faust.toarray()[:out, :inp], m),
                               ratio=t_faust / t_ours)
                rows.append(row)
                print(f"  N={n} {kind}: done", file=sys.stderr, flush=True)
    print(table(rows))
    return {"benchmark": "factorize", "threads": 1, "repeat": repeat, "rows": rows, "pyfaust": why or "ok"}


def table(rows: list[dict]) -> str:
    head = (f"{'N':>5}  {'matrix':<17}{'shape':>11}{'frugalrt s':>11}{'error':>10}{'balanced s':>11}{'error':>10}"
            f"{'pyfaust s':>11}{'error':>10}{'pyfaust/ours':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        faust = (f"{r['pyfaust_s']:>11.4f}{r['pyfaust_error']:>10.3e}{r['ratio']:>13.2f}x" if "ratio" in r
                 else f"{'n/a':>11}{'n/a':>10}{'n/a':>14}")
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        lines.append(f"{r['n']:>5}  {r['matrix']:<17}{shape:>11}{r['frugalrt_s']:>11.4f}{r['frugalrt_error']:>10.3e}"
                     f"{r['balanced_s']:>11.4f}{r['balanced_error']:>10.3e}{faust}")
    if any("clean_error" in r for r in rows):
        lines.append(f"noisy-*: the clean butterfly (best known approximation) has error {NOISE:.3e}")
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
