"""kl inversion and binomial tail inversion against brute force / scipy; vacuous certificates."""
import json
import math

import numpy as np
import pytest
from scipy.stats import binom

from frugalrt.nn.certify import (binomial_tail_inversion, held_out_certificate, kl_inverse_upper,
                                 pac_bayes_kl_bound, stochastic_certificate)


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
