"""Hierarchical butterfly factorization: exact on butterflies (rebuilt with the layer), honest elsewhere."""
import numpy as np
import pytest
import torch
from scipy.linalg import hadamard

from frugalrt.nn import factorize
from frugalrt.nn.factorize import bit_reversal, butterfly_to_dense

SIZES = [2, 4, 8, 16, 32, 64, 128, 256]


def relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_recovered_exactly_and_rebuilds_through_the_layer(n, butterfly_matrix):
    h = hadamard(n).astype(np.float64)
    result = factorize(h)
    assert result.relative_error <= 1e-12
    assert relative(butterfly_matrix(result.twiddles), h) <= 1e-12
    layer = result.to_linear(torch.float64)  # rebuilt by frugalrt's own ButterflyLinear.to_dense
    assert relative(layer.to_dense().numpy(), h) <= 1e-12


@pytest.mark.parametrize("n", SIZES)
def test_dft_with_bit_reversed_columns_is_recovered_exactly(n, butterfly_matrix):
    k = np.arange(n)
    dft = np.exp(-2j * np.pi * np.outer(k, k) / n)[:, bit_reversal(n)]
    result = factorize(dft)
    assert np.iscomplexobj(result.twiddles) and result.relative_error <= 1e-12
    assert relative(butterfly_matrix(result.twiddles), dft) <= 1e-12
    if n > 2:
        with pytest.raises(ValueError, match="complex"):
            result.to_linear()


@pytest.mark.parametrize("n", SIZES)
def test_products_of_random_butterfly_factors_are_recovered_exactly(n, butterfly_matrix):
    rng = np.random.default_rng(n)
    twiddles = rng.standard_normal((n.bit_length() - 1, n // 2, 2, 2))
    matrix = butterfly_matrix(twiddles)
    result = factorize(torch.from_numpy(matrix))
    assert result.relative_error <= 1e-12
    assert relative(result.to_dense(), matrix) <= 1e-12


def test_rebuild_through_torch_path_matches_explicit_stages(butterfly_matrix):
    twiddles = np.random.default_rng(1).standard_normal((4, 8, 2, 2))
    np.testing.assert_allclose(butterfly_to_dense(twiddles), butterfly_matrix(twiddles), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,noise", [(8, 1e-6), (32, 1e-3), (128, 1e-2)])
def test_noisy_butterfly_is_recovered_to_the_noise_level(n, noise, butterfly_matrix):
    """Butterfly + noise of relative size `noise`: the answer is within 2x the noise of both the noisy
    input and the clean butterfly (measured ~0.3x-1x; all-zero factors would give 1)."""
    rng = np.random.default_rng(n)
    clean = butterfly_matrix(rng.standard_normal((n.bit_length() - 1, n // 2, 2, 2)))
    perturbation = rng.standard_normal((n, n))
    noisy = clean + noise * np.linalg.norm(clean) * perturbation / np.linalg.norm(perturbation)
    result = factorize(noisy)
    rebuilt = butterfly_matrix(result.twiddles)
    assert result.relative_error == pytest.approx(relative(rebuilt, noisy), rel=1e-9)
    assert result.relative_error <= 2 * noise and relative(rebuilt, clean) <= 2 * noise


def test_random_dense_matrix_reports_a_large_error(butterfly_matrix):
    matrix = np.random.default_rng(0).standard_normal((128, 128))
    result = factorize(matrix)
    recomputed = relative(butterfly_matrix(result.twiddles), matrix)
    assert result.relative_error == pytest.approx(recomputed, rel=1e-9)
    # large (measured 0.95), yet better than zero factors (error exactly 1)
    assert 0.9 < result.relative_error < 0.99


def test_linear_layer_with_odd_shape_is_padded_and_keeps_bias(butterfly_matrix):
    """A 20 x 10 block of a 32 x 32 butterfly is, zero-padded, a butterfly: recovered exactly, so
    the ButterflyLinear must reproduce the nn.Linear (its weight and bias) itself."""
    lin = torch.nn.Linear(10, 20).double()
    weight = butterfly_matrix(np.random.default_rng(3).standard_normal((5, 16, 2, 2)))[:20, :10]
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(weight))
    result = factorize(lin)
    assert result.n == 32 and result.twiddles.shape == (5, 16, 2, 2) and result.relative_error <= 1e-8
    assert relative(butterfly_matrix(result.twiddles)[:20, :10], weight) <= 1e-8
    x = torch.randn(3, 10, dtype=torch.float64)
    with torch.no_grad():
        want = lin(x).numpy()
        np.testing.assert_allclose(result.to_linear(torch.float64)(x).numpy(), want, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(result.to_linear()(x.float()).numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_embedded_butterfly_in_a_rectangular_layer_is_exact(butterfly_matrix):
    """A 16x16 butterfly placed in the top-left block of a 12 x 16 weight: rows 12..15 dropped."""
    twiddles = np.random.default_rng(2).standard_normal((4, 8, 2, 2))
    weight = butterfly_matrix(twiddles)[:12]
    result = factorize(weight)
    assert result.out_features == 12 and result.in_features == 16
    assert result.relative_error <= 1e-12


def test_bad_input_is_rejected_with_its_shape():
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        factorize(np.zeros((2, 3, 4)))
