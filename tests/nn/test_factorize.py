"""Hierarchical butterfly factorization: exact on butterflies (rebuilt with the layer), honest elsewhere."""
import numpy as np
import pytest
import torch
from scipy.linalg import hadamard

from frugalrt.nn import factorize
from frugalrt.nn.factorize import bit_reversal, butterfly_to_dense
from frugalrt.runtime.reference import butterfly as reference_butterfly

SIZES = [2, 4, 8, 16, 32, 64, 128, 256]


def dense_from_layer_stages(twiddles: np.ndarray) -> np.ndarray:
    """Oracle independent of the factorization code: product of the explicit stage matrices
    B_{L-1} ... B_0 of docs/ops.md (stage s pairs (i, i + 2^s))."""
    stages, half = twiddles.shape[:2]
    n = 2 * half
    total = np.eye(n, dtype=twiddles.dtype)
    for s in range(stages):
        h, b = 1 << s, np.zeros((n, n), dtype=twiddles.dtype)
        for p in range(half):
            i = (p // h) * 2 * h + p % h
            b[np.ix_([i, i + h], [i, i + h])] = twiddles[s, p]
        total = b @ total
    return total


def relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_recovered_exactly_and_rebuilds_through_the_layer(n):
    h = hadamard(n).astype(np.float64)
    result = factorize(h)
    assert result.relative_error <= 1e-12
    assert relative(dense_from_layer_stages(result.twiddles), h) <= 1e-12
    layer = result.to_linear(torch.float64)  # rebuilt by frugalrt's own ButterflyLinear.to_dense
    assert relative(layer.to_dense().numpy(), h) <= 1e-12


@pytest.mark.parametrize("n", SIZES)
def test_dft_with_bit_reversed_columns_is_recovered_exactly(n):
    k = np.arange(n)
    dft = np.exp(-2j * np.pi * np.outer(k, k) / n)[:, bit_reversal(n)]
    result = factorize(dft)
    assert np.iscomplexobj(result.twiddles) and result.relative_error <= 1e-12
    assert relative(dense_from_layer_stages(result.twiddles), dft) <= 1e-12
    if n > 2:
        with pytest.raises(ValueError, match="complex"):
            result.to_linear()


@pytest.mark.parametrize("n", SIZES)
def test_products_of_random_butterfly_factors_are_recovered_exactly(n):
    rng = np.random.default_rng(n)
    twiddles = rng.standard_normal((n.bit_length() - 1, n // 2, 2, 2))
    matrix = dense_from_layer_stages(twiddles)
    result = factorize(torch.from_numpy(matrix))
    assert result.relative_error <= 1e-12
    assert relative(result.to_dense(), matrix) <= 1e-12


def test_rebuild_through_torch_path_matches_explicit_stages():
    twiddles = np.random.default_rng(1).standard_normal((4, 8, 2, 2))
    np.testing.assert_allclose(butterfly_to_dense(twiddles), dense_from_layer_stages(twiddles), rtol=1e-12, atol=1e-12)


def test_random_dense_matrix_reports_a_large_error():
    matrix = np.random.default_rng(0).standard_normal((128, 128))
    result = factorize(matrix)
    recomputed = relative(dense_from_layer_stages(result.twiddles), matrix)
    assert result.relative_error == pytest.approx(recomputed, rel=1e-9)
    assert result.relative_error > 0.9


def test_linear_layer_with_odd_shape_is_padded_and_keeps_bias():
    lin = torch.nn.Linear(10, 20)
    result = factorize(lin)
    assert result.n == 32 and result.twiddles.shape == (5, 16, 2, 2)
    layer = result.to_linear()
    w = lin.weight.detach().double().numpy()
    assert result.relative_error == pytest.approx(relative(layer.to_dense().double().numpy(), w), rel=1e-5)
    x = torch.randn(3, 10)
    expected = reference_butterfly(x.numpy(), result.twiddles.astype(np.float32), lin.bias.detach().numpy(),
                                   out_features=20)
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_embedded_butterfly_in_a_rectangular_layer_is_exact():
    """A 16x16 butterfly placed in the top-left block of a 12 x 16 weight: rows 12..15 dropped."""
    twiddles = np.random.default_rng(2).standard_normal((4, 8, 2, 2))
    weight = dense_from_layer_stages(twiddles)[:12]
    result = factorize(weight)
    assert result.out_features == 12 and result.in_features == 16
    assert result.relative_error <= 1e-12


def test_bad_input_is_rejected_with_its_shape():
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        factorize(np.zeros((2, 3, 4)))
