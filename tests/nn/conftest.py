"""Oracles shared by the layer and factorization tests (independent of frugalrt's own code)."""
import numpy as np
import pytest


def spec_butterfly_matrix(twiddles) -> np.ndarray:
    """The N x N matrix B_{L-1} ... B_0 of docs/ops.md, built entry by entry with explicit loops:
    stage s (stride h = 2^s) puts twiddles[s, p] on rows/columns (i, j), i = (p // h) * 2h + p % h,
    j = i + h. Float64 (complex128 for complex twiddles)."""
    tw = np.asarray(twiddles)
    stages, half = tw.shape[:2]
    n = 2 * half
    total = np.eye(n, dtype=np.result_type(tw.dtype, np.float64))
    for s in range(stages):
        h, stage = 1 << s, np.zeros_like(total)
        for p in range(half):
            i = (p // h) * 2 * h + p % h
            j = i + h
            stage[i, i], stage[i, j] = tw[s, p, 0, 0], tw[s, p, 0, 1]
            stage[j, i], stage[j, j] = tw[s, p, 1, 0], tw[s, p, 1, 1]
        total = stage @ total
    return total


@pytest.fixture
def butterfly_matrix():
    """:func:`spec_butterfly_matrix`, the explicit-loop oracle of the Butterfly op."""
    return spec_butterfly_matrix


def brute_force_kl_inverse(q: float, c: float, step: float = 1e-6) -> float:
    """Largest p on a fine grid over [q, 1] with kl(q || p) <= c (scipy's rel_entr as the oracle)."""
    from scipy.special import rel_entr

    p = np.arange(q, 1.0, step)
    kl = rel_entr(q, p) + rel_entr(1 - q, 1 - p)
    return float(p[kl <= c].max())


@pytest.fixture
def kl_inverse():
    """:func:`brute_force_kl_inverse`, the grid-search oracle of kl^-1 (accurate to ~1e-6)."""
    return brute_force_kl_inverse
