"""Butterfly factorization: exact on butterflies (rebuilt with the layer), near-optimal on noisy ones
(any shape: the block of a padded butterfly), honest elsewhere."""
import math

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard

from frugalrt.nn import factorize
from frugalrt.nn.factorize import METHODS, bit_reversal, butterfly_to_dense, hierarchical_factorization

SIZES = [2, 4, 8, 16, 32, 64, 128, 256]


def relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def stage_oracle(twiddles) -> np.ndarray:
    """docs/ops.md's B_{L-1} ... B_0 built stage by stage with numpy slices (the explicit-loop oracle
    of conftest is too slow beyond N = 512; this one is checked against it below). Stage s: rows
    i = g*2h + q and j = i + h, pair p = g*h + q."""
    tw = np.asarray(twiddles)
    n = 2 * tw.shape[1]
    total = np.eye(n, dtype=np.result_type(tw.dtype, np.float64))
    nxt = np.empty_like(total)
    for s in range(tw.shape[0]):
        h = 1 << s
        x, y = total.reshape(n // (2 * h), 2, h, n), nxt.reshape(n // (2 * h), 2, h, n)
        t = tw[s].reshape(n // (2 * h), h, 2, 2)[..., None]  # g, q, a, b, (column)
        for a in (0, 1):
            np.multiply(t[:, :, a, 0], x[:, 0], out=y[:, a])
            y[:, a] += t[:, :, a, 1] * x[:, 1]
        total, nxt = nxt, total
    return total


def random_butterfly(n: int, rng: np.random.Generator) -> np.ndarray:
    return stage_oracle(rng.standard_normal((n.bit_length() - 1, n // 2, 2, 2)))


def add_noise(clean: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """clean + Gaussian noise of relative Frobenius size exactly ``noise``."""
    e = rng.standard_normal(clean.shape)
    return clean + noise * np.linalg.norm(clean) * e / np.linalg.norm(e)


@pytest.mark.parametrize("n", [2, 8, 64])
def test_stage_oracle_matches_the_explicit_loop_oracle(n, butterfly_matrix):
    twiddles = np.random.default_rng(n).standard_normal((n.bit_length() - 1, n // 2, 2, 2))
    np.testing.assert_allclose(stage_oracle(twiddles), butterfly_matrix(twiddles), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_recovered_exactly_and_rebuilds_through_the_layer(n, method, butterfly_matrix):
    h = hadamard(n).astype(np.float64)
    result = factorize(h, method)
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


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", SIZES)
def test_products_of_random_butterfly_factors_are_recovered_exactly(n, method, butterfly_matrix):
    rng = np.random.default_rng(n)
    twiddles = rng.standard_normal((n.bit_length() - 1, n // 2, 2, 2))
    matrix = butterfly_matrix(twiddles)
    result = factorize(torch.from_numpy(matrix), method)
    assert result.relative_error <= 1e-12
    assert relative(result.to_dense(), matrix) <= 1e-12


def test_rebuild_through_torch_path_matches_explicit_stages(butterfly_matrix):
    twiddles = np.random.default_rng(1).standard_normal((4, 8, 2, 2))
    np.testing.assert_allclose(butterfly_to_dense(twiddles), butterfly_matrix(twiddles), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,noise", [(8, 1e-6), (32, 1e-3), (128, 1e-2)])
def test_noisy_butterfly_is_recovered_to_the_noise_level(n, noise, butterfly_matrix):
    """Butterfly + noise of relative size `noise`: the answer is within 2x the noise of both the noisy
    input and the clean butterfly (measured 0.25x-0.97x; all-zero factors would give 1)."""
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
    # large (measured 0.94; balanced tree 0.95), yet better than zero factors (error exactly 1)
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


@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("n", [512, 1024, 2048])
def test_large_butterflies_are_recovered_exactly(n, kind):
    """Hadamard and a product of random factors, rebuilt by the stage oracle (float64 rounding: ~1e-15)."""
    matrix = hadamard(n).astype(np.float64) if kind == "hadamard" else random_butterfly(n, np.random.default_rng(n))
    result = factorize(matrix)
    assert result.relative_error <= 1e-12 and relative(stage_oracle(result.twiddles), matrix) <= 1e-12


def test_bit_reversed_dft_at_n_1024_is_exact_and_the_plain_dft_is_not():
    """Only the bit-reversed DFT is a butterfly; the plain DFT is nearly orthogonal to the butterflies
    (measured 0.9947)."""
    n = 1024
    k = np.arange(n)
    dft = np.exp(-2j * np.pi * np.outer(k, k) / n)
    assert relative(stage_oracle(factorize(dft[:, bit_reversal(n)]).twiddles), dft[:, bit_reversal(n)]) <= 1e-12
    assert factorize(dft).relative_error > 0.99


def first_order_dof(n: int) -> int:
    """Degrees of freedom of an N x N butterfly: 4 (N/2) L twiddles less N scalings at each of the L - 1
    interfaces between factors = N (L + 1)."""
    return n * (n.bit_length())


# (N, out, in, noise): square powers of two, blocks of a padded butterfly (N = 1024, 2048).
NOISY = [(1024, 1024, 1024, 1e-2), (1024, 1024, 1024, 1e-1), (2048, 2048, 2048, 1e-2),
         (1024, 600, 1000, 1e-2), (1024, 1000, 600, 1e-1), (2048, 1500, 1100, 1e-2)]


@pytest.mark.parametrize("n,out,inp,noise", NOISY)
def test_noisy_butterfly_is_fitted_to_the_optimal_noise_level(n, out, inp, noise):
    """W = block of a butterfly + noise of relative size `noise`. The clean block is the best known
    approximation (error = noise); the best fit removes the noise's part along the p = N (L + 1) directions
    of the butterflies: error = noise sqrt(1 - p / (out in)) and distance to the clean block
    noise sqrt(p / (out in)) to first order. Required: at least half that gain, and the distance within
    1.5x (measured: 0.9946 and 1.01x at N = 1024; the balanced tree gives 1.04 and 3x)."""
    rng = np.random.default_rng(out + inp)
    clean = random_butterfly(n, rng)[:out, :inp]
    noisy = add_noise(clean, noise, rng)
    result = factorize(noisy)
    fit = stage_oracle(result.twiddles)[:out, :inp]
    share = first_order_dof(n) / (out * inp)
    assert result.relative_error == pytest.approx(relative(fit, noisy), rel=1e-9)
    assert result.relative_error <= noise * math.sqrt(1 - share / 2)
    assert relative(fit, clean) <= 1.5 * noise * math.sqrt(share)
    assert result.error_lower_bound <= noise  # the guarantee agrees with the known clean block


@pytest.mark.parametrize("out,inp", [(1, 1), (3, 5), (5, 3), (600, 1000), (1000, 600), (1500, 1100)])
def test_block_of_a_butterfly_is_recovered_exactly_and_the_layer_reproduces_it(out, inp):
    """The block is cut from a butterfly whose other entries are *not* zero: fitting the zero-padded
    block must still be exact (zeroing rows and columns keeps a butterfly a butterfly), and the float64
    ButterflyLinear (input padded with zeros, output truncated) must compute x W^T."""
    n = max(2, 1 << (max(out, inp) - 1).bit_length())
    full = random_butterfly(n, np.random.default_rng(out * inp))
    weight = full[:out, :inp]
    assert np.abs(full[out:]).max(initial=0) > 0 or np.abs(full[:, inp:]).max(initial=0) > 0 or out == inp == n
    result = factorize(weight)
    assert result.n == n and result.relative_error <= 1e-12
    assert relative(stage_oracle(result.twiddles)[:out, :inp], weight) <= 1e-12
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, inp)))
    with torch.no_grad():
        got = result.to_linear(torch.float64)(x).numpy()
    np.testing.assert_allclose(got, x.numpy() @ weight.T, rtol=1e-9, atol=1e-9 * np.abs(weight).sum(1).max())


def test_padding_loses_nothing_against_the_masked_fit():
    """The issue's worry: zero padding forces the unused entries to zero. (1) Hard-impute (refit with the
    unused entries filled by the fit) changes nothing: the fit keeps them exactly zero. (2) Even the
    ideal completion, the true butterfly's own values, fits the block no better (measured 0.9911 vs
    0.9933 x noise)."""
    n, out, inp, noise = 1024, 600, 1000, 1e-2
    rng = np.random.default_rng(7)
    full = random_butterfly(n, rng)
    noisy = add_noise(full[:out, :inp], noise, rng)
    fit = stage_oracle(factorize(noisy).twiddles)
    assert max(np.abs(fit[out:]).max(), np.abs(fit[:, inp:]).max()) <= 1e-12 * np.abs(fit).max()  # measured 0
    imputed = fit.copy()
    imputed[:out, :inp] = noisy
    refit = stage_oracle(hierarchical_factorization(imputed))
    assert relative(refit[:out, :inp], noisy) == pytest.approx(relative(fit[:out, :inp], noisy), rel=1e-9)
    completed = full.copy()
    completed[:out, :inp] = noisy
    ideal = stage_oracle(hierarchical_factorization(completed))
    assert relative(fit[:out, :inp], noisy) <= 1.001 * relative(ideal[:out, :inp], noisy)


def test_unknown_method_is_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="'svd'.*left-to-right, balanced"):
        factorize(np.eye(4), "svd")
