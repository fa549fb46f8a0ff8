"""kl inversion, binomial tail inversion and the three certificates against brute force / scipy; what
``frugalrt validate`` prints of them."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import binom

from frugalrt.nn.certify import (binomial_tail_inversion, disintegrated_certificate, held_out_certificate,
                                 kl_inverse_upper, pac_bayes_kl_bound, stochastic_certificate)


@pytest.mark.parametrize("q, c", [(0.0, 0.01), (0.05, 0.02), (0.1, 0.001), (0.3, 0.1), (0.5, 0.5), (0.9, 0.01)])
def test_kl_inverse_matches_brute_force(q, c, kl_inverse):
    assert kl_inverse_upper(q, c) == pytest.approx(kl_inverse(q, c), abs=2e-6)


def test_kl_inverse_saturates_at_one():
    assert kl_inverse_upper(0.2, 100.0) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("errors, n, delta", [(0, 50, 0.05), (3, 100, 0.05), (18, 360, 0.01), (99, 100, 0.1)])
def test_binomial_tail_inversion_against_scipy(errors, n, delta):
    p = binomial_tail_inversion(errors, n, delta)
    assert binom.cdf(errors, n, p) == pytest.approx(delta, rel=1e-6)  # the tail sits exactly at delta
    assert binom.cdf(errors, n, p + 1e-4) < delta < binom.cdf(errors, n, p - 1e-4)  # and p is the largest


def test_held_out_certificate_is_vacuous_when_the_bound_exceeds_guessing():
    cert = held_out_certificate(errors=95, n=100, classes=10, delta=0.05)
    data = json.loads(cert.to_json())
    assert cert.vacuous and data["vacuous"] is True and data["bound"] > data["trivial"] == pytest.approx(0.9)
    assert not held_out_certificate(errors=5, n=100, classes=10, delta=0.05).vacuous


def stochastic_oracle(kl_inverse, risk, kl, n, delta, delta_mc, m, union=1):
    """The certificate recomputed from its ingredients: both deltas split over the union."""
    mc = kl_inverse(risk, math.log(2 / (delta_mc / union)) / m)
    return mc, kl_inverse(mc, (kl + math.log(2 * math.sqrt(n) / (delta / union))) / n)


@pytest.mark.parametrize("union", [1, 8])
def test_stochastic_certificate_combines_mc_and_pac_bayes_terms(union, kl_inverse):
    rates = np.array([0.08, 0.12] * 5)  # mean 0.1
    cert = stochastic_certificate(rates, kl=5.0, n=1000, classes=10, delta=0.025, delta_mc=0.01, union=union,
                                  mc_count=10_000)
    mc, bound = stochastic_oracle(kl_inverse, 0.1, 5.0, 1000, 0.025, 0.01, 10_000, union)
    assert cert.empirical_risk == pytest.approx(0.1, abs=1e-12) and cert.empirical_risk_bound > 0.1
    assert cert.empirical_risk_bound == pytest.approx(mc, abs=2e-6)
    assert cert.bound == pytest.approx(bound, abs=2e-6)
    data = json.loads(cert.to_json())  # the metadata states the total confidence, both deltas included
    assert (data["union"], data["delta"], data["delta_mc"]) == (union, 0.025, 0.01)
    assert data["confidence"] == pytest.approx(1 - 0.025 - 0.01) and "with prob. >= 0.965" in str(cert)


def test_stochastic_bound_grows_with_the_kl_and_the_union():
    rates = np.full(10, 0.1)
    bounds = [stochastic_certificate(rates, kl, 1000, 10, 0.025, 0.01, mc_count=10_000).bound
              for kl in (0.0, 1.0, 10.0, 50.0)]
    assert all(a < b for a, b in zip(bounds, bounds[1:])), bounds
    unions = [stochastic_certificate(rates, 5.0, 1000, 10, 0.025, 0.01, union=k, mc_count=10_000)
              for k in (1, 8, 64)]
    assert all(a.bound < b.bound and a.empirical_risk_bound < b.empirical_risk_bound
               for a, b in zip(unions, unions[1:]))


def test_huge_kl_gives_a_vacuous_certificate_reported_as_such():
    cert = stochastic_certificate(np.zeros(5), kl=1e4, n=100, classes=10, delta=0.025, delta_mc=0.01)
    assert cert.bound >= 0.9 and cert.vacuous and "VACUOUS" in str(cert)
    assert pac_bayes_kl_bound(0.0, 1e4, 100, 0.025) == 1.0


def test_union_over_candidates_divides_delta():
    single, union = held_out_certificate(4, 200, 10, 0.05), held_out_certificate(4, 200, 10, 0.05, union=8)
    assert union.bound == pytest.approx(binomial_tail_inversion(4, 200, 0.05 / 8)) and union.bound > single.bound


@pytest.mark.parametrize("union, candidates, ratio", [(1, 1, 0.0), (8, 10, 3.5), (16, 10, -2.0)])
def test_disintegrated_certificate_against_brute_force(union, candidates, ratio, kl_inverse):
    """kl^-1(errors / n, (ln dQ/dP + ln(2 sqrt(n) / delta')) / n) with delta' = delta / (union * candidates)."""
    cert = disintegrated_certificate(30, 719, ratio, 10, 0.025, union, candidates)
    c = (ratio + math.log(2 * math.sqrt(719) / (0.025 / (union * candidates)))) / 719
    assert cert.bound == pytest.approx(kl_inverse(30 / 719, c), abs=2e-6) and cert.bound > 30 / 719
    data = json.loads(cert.to_json())
    assert data["confidence"] == pytest.approx(0.975) and data["name"] == "disintegrated-pac-bayes-kl"
    assert (data["candidates"], data["union"], data["log_density_ratio"]) == (candidates, union, ratio)
    assert data["kl"] is None and data["mc_samples"] is None


def test_disintegrated_bound_grows_with_the_log_ratio_and_the_candidates():
    by_ratio = [disintegrated_certificate(10, 500, r, 10, 0.025).bound for r in (-3.0, 0.0, 5.0, 50.0)]
    by_candidates = [disintegrated_certificate(10, 500, 1.0, 10, 0.025, candidates=k).bound for k in (1, 10, 100)]
    for bounds in (by_ratio, by_candidates):
        assert all(a < b for a, b in zip(bounds, bounds[1:])), bounds


def test_disintegrated_right_hand_side_below_zero_gives_no_guarantee():
    """kl >= 0 cannot be <= a negative number: the draw fell in the failure event; bound 1, vacuous."""
    cert = disintegrated_certificate(0, 100, -50.0, 10, 0.025)
    assert cert.bound == 1.0 and cert.vacuous


def test_validate_prints_what_each_certificate_rests_on():
    """frugalrt validate's line: bound, KL or ln dQ/dP, n, total confidence with its deltas, union,
    candidates, prior-only bound, prior and splits."""
    from frugalrt.runtime.validate import _certificate_line

    facts = dict(data_dependent_prior=True, splits={"prior": 718, "bound": 719, "test": 360})
    sto = stochastic_certificate(np.full(10, 0.05), 1.7, 719, 10, 0.025, 0.01, union=16, mc_count=7190)
    sto = replace(sto, prior_only_bound=0.1041, **facts)
    dep = replace(disintegrated_certificate(28, 719, 2.2, 10, 0.025, union=16, candidates=10), **facts)
    tst = held_out_certificate(17, 360, 10, 0.05, union=16)
    lines = [_certificate_line(f"frugalrt.certificate.{k}", json.loads(c.to_json()))
             for k, c in (("stochastic", sto), ("deployed", dep), ("test_set", tst))]
    expected = [
        [f"certificate stochastic: 0-1 risk <= {sto.bound:.4f} (non-vacuous", "KL 1.7", "n 719",
         "confidence 0.965 (1 - delta 0.025 - delta_mc 0.01)", "union 16", "prior-only bound 0.1041",
         "data-dependent prior", "splits bound 719/prior 718/test 360", "; PAC-Bayes-kl"],
        [f"certificate deployed: 0-1 risk <= {dep.bound:.4f}", "ln dQ/dP 2.2", "confidence 0.975 (1 - delta 0.025)",
         "best of draws 10", "disintegrated PAC-Bayes-kl"],
        [f"certificate test_set: 0-1 risk <= {tst.bound:.4f}", "empirical risk 0.0472", "n 360",
         "confidence 0.950 (1 - delta 0.05)", "binomial tail inversion"]]
    for line, texts in zip(lines, expected):
        assert all(t in line for t in texts), (line, [t for t in texts if t not in line])
    assert "KL" not in lines[1] and "ln dQ/dP" not in lines[0]
    assert _certificate_line("frugalrt.certificate.x", {"bound": 0.25}) == "certificate x: 0-1 risk <= 0.2500"
