"""PAC-Bayes binary-activated network: closed forms, exact sampling, KL and densities, objectives,
certificates recomputed from their ingredients, the deployed network, export."""
import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import ndtr
from scipy.stats import binom
from torch.distributions import Bernoulli, Normal, kl_divergence

from frugalrt.nn.binary import BinaryConv2d
from frugalrt.nn.pacbayes import (BinaryActivatedConvNet, BinaryActivatedNet, GaussianBinaryConv2d,
                                  GaussianBinaryLinear, GaussianButterfly, GaussianLinear, butterfly_stages, certify,
                                  deploy, deterministic_certificate, fclassic, fit, flamb, fquad,
                                  gaussian_zero_one_risk, stochastic_error_rates)

SIGNS = (GaussianBinaryLinear, GaussianBinaryConv2d)  # layers whose weights are signs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is much faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    parts = train_test_split(x / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    x_tr, x_te, y_tr, y_te = (torch.tensor(a, dtype=torch.float32 if i < 2 else torch.long)
                              for i, a in enumerate(parts))
    half = len(x_tr) // 2
    return (x_tr[:half], y_tr[:half]), (x_tr[half:], y_tr[half:]), (x_te, y_te)


@pytest.fixture(scope="module")
def trained(digits):
    """A small seeded run: ERM prior on one half, bound-minimizing posterior (fquad) on the other."""
    torch.manual_seed(0)
    prior, bound, _ = digits
    net = BinaryActivatedNet(64, (32, 16), 10)
    fit(net, *prior, 30, objective=None, risk="cross_entropy", lr=0.1, learn_sigma=False)
    net.set_prior()
    fit(net, *bound, 10, objective="fquad", lr=0.05)
    return net


def _perturb(layer, scale=0.5, seed=0):
    """Move the posterior away from the prior (shift and log_scale), so KL and densities are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            p.shift.copy_(scale * torch.randn(p.shift.shape, generator=g))
            p.log_scale.copy_(0.3 * scale * torch.randn(p.log_scale.shape, generator=g))
    return layer


# --- closed forms and exact sampling against explicit weight draws -------------------------------

def test_gaussian_linear_sign_probability_matches_sampled_gaussian_weights():
    layer = _perturb(GaussianLinear(5, 3, sigma=0.7))
    x = torch.randn(1, 5, dtype=torch.float64)
    w, b = layer.weight.rsample((200_000,), dtype=torch.float64), layer.bias.rsample((200_000,), dtype=torch.float64)
    freq = ((torch.einsum("mki,i->mk", w, x[0]) + b) >= 0).double().mean(0)
    with torch.no_grad():
        mean, var = layer.moments(x)
    assert torch.allclose(freq, torch.tensor(ndtr((mean / var.sqrt())[0].numpy())), atol=4 * math.sqrt(0.25 / 200_000))


def test_binary_layer_sampling_matches_its_moments():
    layer = _perturb(GaussianBinaryLinear(6, 2))
    a = torch.tensor([1.0, -1, 1, 1, -1, -1], dtype=torch.float64)
    z = layer.sample(a.expand(20_000, 1, 6), torch.Generator().manual_seed(0))[:, 0]
    with torch.no_grad():
        mean, var = layer.moments(a[None])
    assert torch.allclose(z.mean(0), mean[0], atol=4 * math.sqrt(var.max() / 20_000))
    assert torch.allclose(z.var(0), var[0], rtol=0.05)


def test_butterfly_stages_with_per_row_twiddles_match_the_spec_matrix(butterfly_matrix):
    """Oracle: docs/ops.md's matrix built entry by entry, one network per row."""
    tw, x = torch.randn(3, 4, 8, 2, 2, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    got = butterfly_stages(x, tw, 0, 4)
    want = np.stack([butterfly_matrix(tw[i].numpy()) @ x[i].numpy() for i in range(3)])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_gaussian_butterfly_samples_and_closed_form_match_explicit_draws():
    """For one input: P[y_i >= 0] from (a) the exact sampler, (b) the deployed ButterflyLinear of explicit
    draws, (c) the surrogate's closed form on the last stage averaged over its draws of the others."""
    torch.manual_seed(0)
    layer = _perturb(GaussianButterfly(6, 8, sigma=0.3), scale=0.3)
    x = torch.rand(1, 6, dtype=torch.float64)
    m = 4000
    sampled = (layer.sample(x, m, torch.Generator().manual_seed(1))[:, 0] >= 0).double().mean(0)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        explicit = torch.stack([layer.deploy(layer.draw(gen)).double()(x)[0] >= 0 for _ in range(m)]).double().mean(0)
        mean, var = layer.moments(x.expand(m, 6))
    closed = ((1 + torch.erf(mean / torch.sqrt(2 * var))) / 2).mean(0)
    tol = 4 * math.sqrt(0.25 / m) * math.sqrt(2)
    assert (sampled - explicit).abs().max() < tol and (closed - explicit).abs().max() < tol
    assert ((explicit > 0.05) & (explicit < 0.95)).sum() >= 4  # outputs really random: not a degenerate check


# --- KL and log density ratios against torch.distributions ---------------------------------------

def exact_kl(net) -> float:
    """KL(Q || P) of the whole network from torch.distributions and scipy's Phi (not the layers' own kl())."""
    total = 0.0
    with torch.no_grad():
        for layer in net.layers():
            params = [layer.bias] if isinstance(layer, SIGNS) else [layer.weight, layer.bias]
            for p in params:
                total += kl_divergence(Normal(p.mu.double(), p.sigma.double()),
                                       Normal(p.prior_mu.double(), p.prior_log_sigma.double().exp())).sum().item()
            if isinstance(layer, SIGNS):
                w = layer.weight
                q = torch.tensor(ndtr((w.mu / w.sigma).double().numpy()))
                q0 = torch.tensor(ndtr((w.prior_mu / w.prior_log_sigma.exp()).double().numpy()))
                total += kl_divergence(Bernoulli(probs=q), Bernoulli(probs=q0)).sum().item()
    return total


def exact_log_ratio(layer, drawn) -> float:
    """ln q(h) / p(h) from torch.distributions: Gaussian densities, Bernoulli(Phi(mu / sigma)) for signs."""
    total = 0.0
    with torch.no_grad():
        for name, p in (("weight", layer.weight), ("bias", layer.bias)):
            v = drawn[name].double()
            if name == "weight" and isinstance(layer, SIGNS):
                q = torch.tensor(ndtr((p.mu / p.sigma).double().numpy()))
                q0 = torch.tensor(ndtr((p.prior_mu / p.prior_log_sigma.exp()).double().numpy()))
                k = (v > 0).double()
                total += (Bernoulli(probs=q).log_prob(k) - Bernoulli(probs=q0).log_prob(k)).sum().item()
            else:
                total += (Normal(p.mu.double(), p.sigma.double()).log_prob(v)
                          - Normal(p.prior_mu.double(), p.prior_log_sigma.double().exp()).log_prob(v)).sum().item()
    return total


@pytest.mark.parametrize("first", ["linear", "butterfly"])
def test_kl_and_log_ratio_match_torch_distributions(first):
    net = BinaryActivatedNet(6, (8, 4), 3, first=first)
    for i, layer in enumerate(net.layers()):
        _perturb(layer, seed=i)
    assert net.kl().item() == pytest.approx(exact_kl(net), rel=1e-6) and net.kl().item() > 1  # float32 parameters
    drawn = net.draw(torch.Generator().manual_seed(0))
    assert drawn.log_ratio == pytest.approx(sum(exact_log_ratio(l, d) for l, d in zip(net.layers(), drawn.layers)),
                                            rel=1e-6, abs=1e-6)


def test_log_ratio_averages_to_the_kl():
    """E_{h~Q} ln q(h)/p(h) = KL(Q||P): 3000 draws, within 4 standard errors."""
    net = BinaryActivatedNet(4, (6,), 3)
    for i, layer in enumerate(net.layers()):
        _perturb(layer, scale=0.3, seed=i)
    gen = torch.Generator().manual_seed(0)
    ratios = np.array([net.draw(gen).log_ratio for _ in range(3000)])
    assert abs(ratios.mean() - net.kl().item()) < 4 * ratios.std() / math.sqrt(3000)


def test_set_prior_and_prior_copy():
    net = BinaryActivatedNet(5, (4,), 3)
    for i, layer in enumerate(net.layers()):
        _perturb(layer, seed=i)
    before = [l.weight.mu.detach().clone() for l in net.layers()]
    assert net.kl().item() > 0 and net.prior_copy().kl().item() == 0.0
    assert torch.equal(net.prior_copy().first.weight.mu, net.first.weight.prior_mu)
    net.set_prior()
    assert net.kl().item() == 0.0
    assert all(torch.allclose(l.weight.mu, b, atol=1e-6) for l, b in zip(net.layers(), before))


# --- objectives and the surrogate risk ------------------------------------------------------------

@pytest.mark.parametrize("risk, kl, n", [(0.0, 0.0, 100), (0.05, 3.0, 719), (0.3, 40.0, 500), (0.1, 0.5, 10_000)])
def test_objectives_match_their_formulas_and_upper_bound_the_kl_inverse(risk, kl, n, kl_inverse):
    """Oracles: the closed forms written out, flamb as a brute-force minimum over lambda, and the
    PAC-Bayes-kl bound itself (grid kl^-1): every objective must be >= it, KL included."""
    delta = 0.025
    c = (kl + math.log(2 * math.sqrt(n) / delta)) / n
    r, k = torch.tensor(risk, dtype=torch.float64), torch.tensor(kl, dtype=torch.float64)
    lams = np.linspace(1e-4, 2 - 1e-4, 200_001)
    assert fclassic(r, k, n, delta).item() == pytest.approx(risk + math.sqrt(c / 2), rel=1e-12)
    assert fquad(r, k, n, delta).item() == pytest.approx((math.sqrt(risk + c / 2) + math.sqrt(c / 2)) ** 2, rel=1e-12)
    assert flamb(r, k, n, delta).item() == pytest.approx(np.min(risk / (1 - lams / 2) + c / (lams * (1 - lams / 2))),
                                                         rel=1e-6)
    assert flamb(r, k, n, delta).item() == pytest.approx(fquad(r, k, n, delta).item(), rel=1e-9)  # same at the optimum
    floor = kl_inverse(risk, c)
    assert min(fclassic(r, k, n, delta).item(), fquad(r, k, n, delta).item(), flamb(r, k, n, delta).item()) >= floor


def test_gaussian_zero_one_risk_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean = 2 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    var = torch.rand(5, 4, generator=g, dtype=torch.float64) + 0.2
    y = torch.tensor([0, 1, 2, 3, 0])
    z = mean + var.sqrt() * torch.randn(400_000, 5, 4, generator=g, dtype=torch.float64)
    mc = (z.argmax(-1) != y).double().mean()
    assert gaussian_zero_one_risk(mean, var, y).item() == pytest.approx(mc.item(), abs=4 * math.sqrt(0.25 / 2e6))


# --- the trained network: sampling, certificates ----------------------------------------------------

def numpy_error_rates(net, x, y, draws, seed) -> np.ndarray:
    """Independent sampler, a fresh network per (draw, example) with explicit weights: first layer
    W ~ N(mu, sigma^2), b ~ N(mu_b, sigma_b^2); then s = sign of N(mu, sigma^2) latents, Gaussian bias,
    sign activations, argmax output."""
    rng = np.random.default_rng(seed)
    p = lambda t: t.detach().double().numpy()  # noqa: E731
    f = net.first
    rates = []
    for _ in range(draws):
        w = p(f.weight.mu) + p(f.weight.sigma) * rng.standard_normal((len(x), *f.weight.mu.shape))
        b = p(f.bias.mu) + p(f.bias.sigma) * rng.standard_normal((len(x), f.out_features))
        z = np.einsum("bki,bi->bk", w, x.double().numpy()) + b
        for layer in net.binary:
            lw, lb = layer.weight, layer.bias
            s = np.where(p(lw.mu) + p(lw.sigma) * rng.standard_normal((len(x), *lw.mu.shape)) >= 0, 1.0, -1.0)
            z = np.einsum("bki,bi->bk", s, np.where(z >= 0, 1.0, -1.0))
            z = z + p(lb.mu) + p(lb.sigma) * rng.standard_normal(z.shape)
        rates.append(np.mean(z.argmax(1) != y.numpy()))
    return np.array(rates)


@pytest.mark.parametrize("widen", [0.0, 2.0])
def test_monte_carlo_error_matches_an_independent_sampler(trained, digits, widen):
    """Means of 10 draws x 629 examples (standard error <= 0.007); ``widen`` 2 multiplies the binary
    layers' sigma by e^2, making their weights far from deterministic (P[s = +1] near 1/2)."""
    net, (x, y) = copy.deepcopy(trained), digits[1]
    with torch.no_grad():
        for layer in net.binary:
            layer.weight.log_scale.add_(widen)
    rates = stochastic_error_rates(net, x, y, draws=10, seed=0)
    assert abs(rates.mean() - numpy_error_rates(net, x, y, 10, seed=0).mean()) < 0.03
    assert rates.std() > 0  # every draw samples fresh networks
    seeds = [stochastic_error_rates(net, x, y, draws=3, seed=seed) for seed in (0, 1)]
    assert not np.array_equal(*seeds)


def test_each_draw_and_example_gets_its_own_network(trained, digits):
    """One example repeated 400 times: with a fresh network per (draw, example), a draw's error rate is
    Binomial(400, p) / 400 (std ~ sqrt(p(1-p)/400)); one network per draw would give 0 or 1."""
    net = trained.prior_copy()
    with torch.no_grad():
        net.first.weight.log_scale.fill_(3.0)  # very noisy first layer: p well inside (0, 1)
    x, y = digits[1][0][:1].expand(400, 64), digits[1][1][:1].expand(400)
    rates = stochastic_error_rates(net, x, y, draws=30, seed=0)
    p = rates.mean()
    assert 0.1 < p < 0.9 and rates.std() < 3 * math.sqrt(p * (1 - p) / 400)


def test_training_learns_means_and_sigmas(trained, digits):
    """The posterior moved from its prior in both means and sigmas, and did better on the bound split."""
    for layer in trained.layers():
        assert layer.weight.shift.abs().max() > 0.05 and layer.weight.log_scale.abs().max() > 0.01
    prior_rate = stochastic_error_rates(trained.prior_copy(), *digits[1], draws=10).mean()
    assert trained.kl().item() > 0.31 and stochastic_error_rates(trained, *digits[1], draws=10).mean() < prior_rate


def test_bound_objective_restrains_the_kl(trained, digits):
    """From the same prior, seed and data: fquad keeps the KL far below what the risk alone reaches."""
    kls, (x, y) = [], digits[1]
    for objective in ("fquad", None):
        net = trained.prior_copy()
        fit(net, x[:256], y[:256], 3, objective=objective, lr=0.05)
        kls.append(net.kl().item())
    assert kls[0] < 0.2 * kls[1], kls


def test_certificate_is_recomputed_from_its_ingredients(trained, digits, kl_inverse):
    """KL from torch.distributions, union bound over 8 settings on both deltas, brute-force kl^-1."""
    x, y = digits[1]
    cert = certify(trained, (x, y), delta=0.025, draws=10, delta_mc=0.01, union=8)
    kl, n, m = exact_kl(trained), len(y), 10 * len(y)
    assert kl > 0.1 and cert.kl == pytest.approx(kl, rel=1e-6)
    assert cert.empirical_risk == pytest.approx(stochastic_error_rates(trained, x, y, 10, seed=0).mean(), abs=1e-12)
    mc = kl_inverse(cert.empirical_risk, math.log(2 / (0.01 / 8)) / m)
    assert cert.empirical_risk_bound == pytest.approx(mc, abs=2e-6) and cert.empirical_risk_bound > cert.empirical_risk
    assert cert.bound == pytest.approx(kl_inverse(mc, (kl + math.log(2 * math.sqrt(n) / (0.025 / 8))) / n), abs=2e-6)
    assert cert.union == 8 and cert.confidence_loss == pytest.approx(0.035)


def test_certificate_bounds_the_held_out_error_of_the_stochastic_predictor(trained, digits):
    _, bound, test = digits
    cert = certify(trained, bound, delta=0.025, draws=10)
    test_error = stochastic_error_rates(trained, *test, draws=10, seed=1).mean()
    assert cert.n == len(bound[1]) and cert.mc_samples == 10 * len(bound[1]) and cert.kl >= 0
    assert cert.empirical_risk <= cert.empirical_risk_bound <= cert.bound
    assert test_error <= cert.bound < 0.5


def test_tiny_bound_set_gives_a_vacuous_certificate(trained, digits):
    _, (x, y), _ = digits
    cert = certify(trained, (x[:3], y[:3]), delta=0.025, draws=5)
    assert cert.vacuous and cert.bound >= cert.trivial and '"vacuous": true' in cert.to_json()


# --- the deployed network ---------------------------------------------------------------------------

def _drawn_from_module(model, net):
    """The deployed module's own parameters, as draws (signs unpacked from the frozen BinaryLinear)."""
    from frugalrt.nn.ops import unpack_signs

    first = {"weight": model[0].weight.detach(), "bias": model[0].bias.detach()}
    rest = [{"weight": unpack_signs(m.weight_packed, m.in_features), "bias": m.bias.detach()} for m in model[1:]]
    return [first, *rest]


def test_deployed_certificate_is_recomputed_from_the_exported_network(trained, digits, kl_inverse):
    """Errors of the returned module, ln dQ/dP of its own weights (torch.distributions), delta split
    over 8 settings x 5 candidates, brute-force kl^-1."""
    x, y = digits[1]
    model, cert = deploy(trained, (x, y), delta=0.025, candidates=5, union=8, seed=3)
    with torch.no_grad():
        errors = int((model(x).argmax(1) != y).sum())
    ratio = sum(exact_log_ratio(l, d) for l, d in zip(trained.layers(), _drawn_from_module(model, trained)))
    assert cert.empirical_risk == errors / len(y) and cert.log_density_ratio == pytest.approx(ratio, rel=1e-4, abs=1e-3)
    c = (ratio + math.log(2 * math.sqrt(len(y)) / (0.025 / 40))) / len(y)
    assert cert.bound == pytest.approx(kl_inverse(errors / len(y), c), abs=1e-4)
    assert (cert.union, cert.candidates, cert.kl, cert.mc_samples) == (8, 5, None, None)
    assert json.loads(cert.to_json())["confidence"] == pytest.approx(0.975)


def test_deployed_draws_are_random_and_average_to_the_gibbs_risk(trained, digits):
    """The deployed (float32, exportable) network of a draw is a sample of the stochastic predictor:
    its mean error over 40 draws matches the Monte Carlo Gibbs risk (standard errors ~0.004)."""
    x, y = digits[1]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        errs = [float((trained.deterministic(trained.draw(gen))(x).argmax(1) != y).double().mean()) for _ in range(40)]
    assert np.std(errs) > 0
    assert abs(np.mean(errs) - stochastic_error_rates(trained, x, y, draws=60, seed=1).mean()) < 0.02
    (a, _), (b, _) = (deploy(trained, (x, y), candidates=2, seed=seed) for seed in (0, 1))
    assert not torch.equal(a[0].weight, b[0].weight)  # deploy's draws depend on its seed


def test_deterministic_network_is_linear_then_xnor_sums(trained, digits):
    """Oracle: numpy signs of the Linear output, then +-1 matrix products with the drawn signs plus bias."""
    x = digits[2][0][:50]
    drawn = trained.draw(torch.Generator().manual_seed(0))
    model = trained.deterministic(drawn)
    with torch.no_grad():
        got = model(x).numpy()
    a = x.double().numpy() @ drawn.layers[0]["weight"].numpy().T + drawn.layers[0]["bias"].numpy()
    for d in drawn.layers[1:]:
        a = np.where(a >= 0, 1, -1) @ d["weight"].numpy().T + d["bias"].numpy()
    np.testing.assert_allclose(got, a, atol=1e-4)
    cert = deterministic_certificate(model, digits[2], delta=0.05)
    errors = int((model(digits[2][0]).argmax(1) != digits[2][1]).sum())
    assert cert.empirical_risk == errors / len(digits[2][1]) <= cert.bound


@pytest.mark.parametrize("first, ops", [("linear", {"ai.frugalrt::BinaryGemm": 2}),
                                        ("butterfly", {"ai.frugalrt::Butterfly": 1, "ai.frugalrt::BinaryGemm": 2})])
def test_export_carries_certificates_and_matches_pytorch(digits, tmp_path, first, ops):
    import frugalrt
    from frugalrt.export.metadata import get_metadata
    from frugalrt.runtime.ort import run

    net = BinaryActivatedNet(64, (32, 16), 10, first=first)
    model, cert = deploy(net, digits[1], candidates=2)
    x = digits[2][0][:40]
    frugalrt.export(model, (x[:7],), tmp_path / "pb.onnx", metadata={"frugalrt.certificate.deployed": cert.to_json()})
    meta = get_metadata(tmp_path / "pb.onnx")
    assert meta["frugalrt.certificate.deployed"] == cert.to_json()
    inventory = json.loads(meta["frugalrt.ops"])
    assert all(inventory.get(k) == v for k, v in ops.items())
    with torch.no_grad():
        np.testing.assert_allclose(run(tmp_path / "pb.onnx", [x.numpy()])[0], model(x).numpy(), atol=1e-4)


def test_digits_example_states_its_certificates(monkeypatch, kl_inverse):
    """examples/digits_pacbayes.py (training shortened): the three certificates in the exported metadata,
    recomputed from their JSON ingredients with delta / 16 (and delta_mc / 16, and / 10 candidates),
    with their confidence, split sizes and data-dependent prior."""
    path = Path(__file__).parents[2] / "examples" / "digits_pacbayes.py"
    spec = importlib.util.spec_from_file_location("digits_pacbayes", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for name, value in (("PRIOR_EPOCHS", 2), ("POSTERIOR_EPOCHS", 1), ("DRAWS", 2)):
        monkeypatch.setattr(example, name, value)
    model, _ = example.build()
    sto, dep, tst = (json.loads(model.frugalrt_metadata[f"frugalrt.certificate.{k}"])
                     for k in ("stochastic", "deployed", "test_set"))
    for cert in (sto, dep, tst):
        assert cert["union"] == 16 and cert["data_dependent_prior"] is True
        assert cert["splits"] == {"prior": 718, "bound": 719, "test": 360}
    assert (sto["confidence"], dep["confidence"], tst["confidence"]) == pytest.approx((1 - 0.035, 1 - 0.025, 1 - 0.05))
    assert [c["name"] for c in (sto, dep, tst)] == ["pac-bayes-kl", "disintegrated-pac-bayes-kl", "test-set-binomial"]
    mc = kl_inverse(sto["empirical_risk"], math.log(2 / (0.01 / 16)) / sto["mc_samples"])
    assert sto["empirical_risk_bound"] == pytest.approx(mc, abs=2e-6)
    c = (sto["kl"] + math.log(2 * math.sqrt(719) / (0.025 / 16))) / 719
    assert sto["bound"] == pytest.approx(kl_inverse(mc, c), abs=2e-6)
    assert sto["prior_only_bound"] is not None and sto["kl"] > 0
    c = (dep["log_density_ratio"] + math.log(2 * math.sqrt(719) / (0.025 / 160))) / 719
    assert dep["candidates"] == 10 and dep["bound"] == pytest.approx(kl_inverse(dep["empirical_risk"], c), abs=2e-6)
    errors = round(tst["empirical_risk"] * tst["n"])
    assert binom.cdf(errors, tst["n"], tst["bound"]) == pytest.approx(0.05 / 16, rel=1e-6)


# --- GaussianBinaryConv2d and the convolutional network ---------------------------------------------

def _conv_reference(a, signs, bias, stride, padding, pad_value=0):
    """z[m] = sum over in-image taps of s[m] a[m] + b[m], one network per row m: the im2col sum (F.unfold
    zero-pads, so a padded tap multiplies 0; pad_value=1: a padded with +1 first), not a convolution."""
    if pad_value:
        a = torch.nn.functional.pad(a, (padding[1], padding[1], padding[0], padding[0]), value=1.0)
        padding = (0, 0)
    cols = torch.nn.functional.unfold(a, signs.shape[-2:], padding=padding, stride=stride)  # [M, C*kh*kw, P]
    z = torch.einsum("mok,mkp->mop", signs.flatten(2), cols) + bias[..., None]
    oh = (a.shape[2] + 2 * padding[0] - signs.shape[-2]) // stride[0] + 1
    return z.reshape(*z.shape[:2], oh, -1)


def _latent_sign_draws(layer, m, g):
    """m networks drawn through the latent Gaussians: s = sign(mu + sigma eps), b = mu_b + sigma_b eps."""
    w, b = layer.weight, layer.bias
    with torch.no_grad():
        eps = torch.randn((m, *w.mu.shape), generator=g, dtype=torch.float64)
        s = torch.where(w.mu.double() + w.sigma.double() * eps >= 0, 1.0, -1.0).double()
        return s, b.mu.double() + b.sigma.double() * torch.randn((m, *b.mu.shape), generator=g, dtype=torch.float64)


def test_binary_conv_kl_matches_brute_force_over_signs_and_torch_distributions():
    """KL(Q || P) of a 2x1x2x2 layer by enumerating its 2^8 sign tensors (joint probabilities from scipy's Phi)
    plus the bias's Gaussian KL from torch.distributions; ln dQ/dP at a draw against torch.distributions."""
    import itertools

    layer = _perturb(GaussianBinaryConv2d(2, 1, 2, sigma=0.8, sigma_bias=0.5), scale=0.7)
    w = layer.weight
    with torch.no_grad():
        q, q0 = (ndtr(t.double().flatten().numpy()) for t in (w.mu / w.sigma, w.prior_mu / w.prior_log_sigma.exp()))
        bias_kl = kl_divergence(Normal(layer.bias.mu.double(), layer.bias.sigma.double()),
                                Normal(layer.bias.prior_mu.double(), layer.bias.prior_log_sigma.double().exp())).sum()
    configs = np.array(list(itertools.product((1.0, -1.0), repeat=8)))
    joint_q, joint_p = (np.prod(np.where(configs > 0, r, 1 - r), axis=1) for r in (q, q0))
    brute = float(np.sum(joint_q * np.log(joint_q / joint_p))) + bias_kl.item()
    assert joint_q.sum() == pytest.approx(1.0, abs=1e-12) and brute > 0.5
    assert layer.kl().item() == pytest.approx(brute, rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        drawn = layer.draw(gen)
        assert set(drawn["weight"].unique().tolist()) <= {-1.0, 1.0} and drawn["weight"].shape == (1, 2, 2, 2)
        assert layer.log_ratio(drawn) == pytest.approx(exact_log_ratio(layer, drawn), rel=1e-6)  # float32 mu / sigma


@pytest.mark.parametrize("pad_value", [0, 1])
def test_binary_conv_moments_match_monte_carlo_with_padding_and_stride(pad_value):
    """Closed form given independent +-1 inputs of mean a_mean against 40,000 explicit networks (latent
    Gaussians) on explicit random inputs, im2col sums: per output unit (corners see fewer in-image taps,
    unless pad_value=1 makes the padded ones +1 inputs)."""
    g = torch.Generator().manual_seed(0)
    layer = _perturb(GaussianBinaryConv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 1), sigma=0.8,
                                          pad_value=pad_value), scale=0.8)
    a_mean = (2 * torch.rand(1, 2, 5, 4, generator=g, dtype=torch.float64) - 1) * 0.9
    m = 40_000
    a = torch.where(torch.rand((m, 2, 5, 4), generator=g, dtype=torch.float64) < (1 + a_mean) / 2, 1.0, -1.0).double()
    s, b = _latent_sign_draws(layer, m, g)
    z = _conv_reference(a, s, b, (2, 1), (1, 1), pad_value)
    with torch.no_grad():
        mean, var = layer.moments(a_mean)
    assert mean.shape == var.shape == (1, 3, 3, 5) == (1, *layer.output_shape(5, 4))
    assert (mean[0] - z.mean(0)).abs().max() < 4.5 * math.sqrt(var.max() / m)
    assert torch.allclose(z.var(0), var[0], rtol=0.04)
    if not pad_value:
        assert var[0, :, 0, 0].max() < var[0, :, 1, 1].min()  # a corner has 2 of 6 taps in the image, the centre 6


@pytest.mark.parametrize("pad_value", [0, 1])
def test_binary_conv_sampler_matches_explicit_networks_shared_across_positions(pad_value):
    """``sample`` (fresh network per draw and example, shared by an image's positions) against explicit
    latent-Gaussian networks: per-unit means, the covariance between positions (shared weights), and
    no covariance between two examples with the same image (distinct networks)."""
    g = torch.Generator().manual_seed(1)
    layer = _perturb(GaussianBinaryConv2d(2, 2, 3, stride=1, padding=1, sigma=0.8, pad_value=pad_value), scale=0.8,
                     seed=1)
    images = torch.where(torch.rand((3, 2, 4, 4), generator=g) < 0.5, 1.0, -1.0).double()
    images[1] = images[0]  # examples 0 and 1 share an image, example 2 has its own
    m = 20_000
    got = layer.sample(images.expand(m, 3, 2, 4, 4), torch.Generator().manual_seed(2))  # [m, 3, 2, 4, 4]
    assert got.shape == (m, 3, 2, 4, 4)
    for e in (0, 2):
        s, b = _latent_sign_draws(layer, m, g)
        want = _conv_reference(images[e].expand(m, 2, 4, 4), s, b, (1, 1), (1, 1), pad_value)
        sd = want.flatten(1).std(0).max().item()
        assert (got[:, e].mean(0) - want.mean(0)).abs().max() < 4.5 * sd / math.sqrt(m)
        cov_got, cov_want = (torch.cov(t[:, 0].flatten(1).T) for t in (got[:, e], want))  # 16 positions, channel 0
        tol = 0.06 * cov_want.diagonal().max()  # ~6 standard errors of a covariance estimate
        assert (cov_got - cov_want).abs().max() < tol
        off = cov_want - cov_want.diagonal().diag()
        assert off.abs().max() > 3 * tol  # the shared weights correlate positions: a visible structure
    cross = torch.corrcoef(torch.stack([got[:, 0].flatten(1)[:, 5], got[:, 1].flatten(1)[:, 5]]))[0, 1]
    assert abs(cross) < 4 / math.sqrt(m)  # same image, independent networks


@pytest.mark.parametrize("pad_value", [0, 1])
def test_binary_conv_deploys_its_draw_as_a_frozen_binary_conv2d(pad_value):
    """The deployed BinaryConv2d (frozen, scale 1) computes F.conv2d(sign(x), drawn signs) + drawn bias,
    padding (zeros, or ones) after the sign (float64 oracle; x has exact zeros: sign(0) = +1); no draw:
    signs of mu."""
    from frugalrt.nn.ops import unpack_signs

    layer = _perturb(GaussianBinaryConv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), pad_value=pad_value))
    drawn = layer.draw(torch.Generator().manual_seed(0))
    x = torch.randn(5, 3, 7, 6)
    x[x.abs() < 0.3] = 0.0
    conv = layer.deploy(drawn)
    assert isinstance(conv, BinaryConv2d) and conv.frozen and torch.equal(conv.weight_scale_, torch.ones(4))
    assert (conv.stride, conv.padding, conv.kernel_size, conv.pad_value) == ((2, 1), (1, 2), (3, 2), pad_value)
    assert torch.equal(unpack_signs(conv.weight_packed, 18).reshape(4, 3, 3, 2).double(), drawn["weight"])
    signs = torch.nn.functional.pad(torch.where(x >= 0, 1.0, -1.0).double(), (2, 2, 1, 1), value=float(pad_value))
    want = torch.nn.functional.conv2d(signs, drawn["weight"], drawn["bias"], stride=(2, 1))
    with torch.no_grad():
        np.testing.assert_allclose(conv(x).double().numpy(), want.numpy(), atol=1e-5)
        mean_signs = torch.where(layer.weight.mu >= 0, 1.0, -1.0)
        assert torch.equal(unpack_signs(layer.deploy().weight_packed, 18).reshape(4, 3, 3, 2), mean_signs)


def test_conv_net_passes_pad_value_to_every_convolution_and_its_deployed_layer():
    net = BinaryActivatedConvNet((1, 8, 8), [(4, 3, 1, 1), (6, 3, 2, 1)], (), 10, pad_value=1)
    assert [layer.pad_value for layer in net.conv] == [1, 1]
    assert [m.pad_value for m in net.deterministic() if isinstance(m, BinaryConv2d)] == [1, 1]
    with pytest.raises(ValueError, match="pad_value must be 0 or 1, got 2"):
        BinaryActivatedConvNet((1, 8, 8), [(4, 3, 1, 1)], (), 10, pad_value=2)


@pytest.fixture(scope="module")
def conv_trained(digits):
    """A tiny conv net on the 8x8 digits (1x8x8, centered): prior by cross-entropy, posterior by fquad."""
    torch.manual_seed(0)
    images = [(x.reshape(-1, 1, 8, 8) - 0.5, y) for x, y in digits]
    net = BinaryActivatedConvNet((1, 8, 8), [(4, 3, 1, 1), (6, 3, 2, 1)], (), 10)
    fit(net, *images[0], 8, objective=None, risk="cross_entropy", lr=0.1, learn_sigma=False)
    net.set_prior()
    history = fit(net, *images[1], 3, objective="fquad", lr=0.05)
    return net, images, history


def test_conv_net_trains_with_fquad_and_exports_the_certified_draw(conv_trained, tmp_path):
    """fquad moves the posterior (KL > 0, objective decreasing); deploy's network exports with two BinaryConv
    and one BinaryGemm, runs in ONNX Runtime as in PyTorch, and its certificate's ln dQ/dP is that of the
    exported module's own weights (torch.distributions)."""
    import frugalrt
    from frugalrt.export.metadata import get_metadata
    from frugalrt.nn.ops import unpack_signs
    from frugalrt.runtime.ort import run

    net, images, history = conv_trained
    assert net.kl().item() > 0.05 and history[-1] < history[0]
    assert net.kl().item() == pytest.approx(exact_kl(net), rel=1e-6)
    model, cert = deploy(net, images[1], candidates=2, seed=0)
    assert [type(m).__name__ for m in model] == ["BinaryConv2d", "BinaryConv2d", "Flatten", "BinaryLinear"]
    parts = [m for m in model if not isinstance(m, torch.nn.Flatten)]
    own = [{"weight": unpack_signs(m.weight_packed, l.weight.mu[0].numel()).reshape(l.weight.mu.shape),
            "bias": m.bias.detach()} for m, l in zip(parts, net.layers())]
    ratio = sum(exact_log_ratio(l, d) for l, d in zip(net.layers(), own))
    with torch.no_grad():
        errors = int((model(images[1][0]).argmax(1) != images[1][1]).sum())
    assert cert.log_density_ratio == pytest.approx(ratio, rel=1e-4, abs=1e-3)
    assert cert.empirical_risk == errors / len(images[1][1])
    x = images[2][0][:40]
    frugalrt.export(model, (x[:7],), tmp_path / "conv.onnx", metadata={"frugalrt.certificate.deployed": cert.to_json()})
    inventory = json.loads(get_metadata(tmp_path / "conv.onnx")["frugalrt.ops"])
    assert inventory.get("ai.frugalrt::BinaryConv") == 2 and inventory.get("ai.frugalrt::BinaryGemm") == 1
    with torch.no_grad():
        np.testing.assert_allclose(run(tmp_path / "conv.onnx", [x.numpy()])[0], model(x).numpy(), atol=1e-4)


def test_conv_net_sampler_and_deployed_draws_agree(conv_trained):
    """The exact stochastic conv net (``sample_predictions``: fresh network per draw and example) and the
    deployed networks of explicit draws (frozen BinaryConv2d, Flatten, BinaryLinear) have the same mean
    error on the bound split (30 draws each, standard errors ~0.01), and both beat chance by far."""
    net, images, _ = conv_trained
    x, y = images[1]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        deployed = [float((net.deterministic(net.draw(gen))(x).argmax(1) != y).double().mean()) for _ in range(30)]
    gibbs = stochastic_error_rates(net, x, y, draws=30, seed=1)
    assert np.std(deployed) > 0 and gibbs.std() > 0
    assert abs(np.mean(deployed) - gibbs.mean()) < 0.04 and gibbs.mean() < 0.6
