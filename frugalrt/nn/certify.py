"""Risk certificates: kl inversion (PAC-Bayes-kl bound) and binomial tail inversion (test-set bound).

* Stochastic predictor (Gibbs, weights drawn from the posterior Q): Maurer's PAC-Bayes-kl bound
  ``kl(R_S(Q) || R(Q)) <= (KL(Q||P) + ln(2 sqrt(n) / delta)) / n`` (Seeger 2002, Maurer 2004), with
  R_S(Q) itself estimated from m independent Monte Carlo samples and bounded by
  ``kl^-1(R_hat_m, ln(2/delta_mc) / m)`` (Langford & Caruana 2001), as Pérez-Ortiz et al. (JMLR 2021,
  *Tighter risk certificates for neural networks*) do. Holds with probability >= 1 - delta - delta_mc.
  When the posterior was selected among ``union`` settings, each setting's certificate uses
  delta / union and delta_mc / union (union bound), so the total stays 1 - delta - delta_mc.
* One network h drawn from Q (the deployed network): the disintegrated PAC-Bayes-kl bound
  ``kl(R_S(h) || R(h)) <= (ln dQ/dP(h) + ln(2 sqrt(n) / delta)) / n`` (Rivasplata et al., NeurIPS
  2020, Th. 1(i), with Maurer's 2 sqrt(n)); it holds with probability >= 1 - delta over S *and* the
  draw, for the drawn network itself, without a test set (docs/pacbayes.md).
* Deterministic predictor on a held-out test set of n examples with k errors: the binomial tail
  inversion ``sup{p : P[Binomial(n, p) <= k] >= delta}`` (Langford, JMLR 2005), i.e. the
  Clopper-Pearson upper limit.

A bound that is >= the error of uniform guessing (1 - 1/classes) says nothing: it is marked
``vacuous`` and still reported.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np


BOUNDS = ("pac-bayes-kl", "disintegrated-pac-bayes-kl", "test-set-binomial")  # Certificate.name


def kl_bernoulli(q: float, p: float) -> float:
    """kl(q || p) = q ln(q/p) + (1-q) ln((1-q)/(1-p)) between Bernoulli distributions."""
    total = 0.0
    if q > 0:
        total += q * math.log(q / p) if p > 0 else math.inf
    if q < 1:
        total += (1 - q) * math.log((1 - q) / (1 - p)) if p < 1 else math.inf
    return total


def kl_inverse_upper(q: float, c: float, tol: float = 1e-12) -> float:
    """kl^-1(q, c) = sup{p in [q, 1] : kl(q || p) <= c}, by bisection (kl(q||.) increases on [q, 1])."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"kl_inverse_upper: empirical risk q={q} is not in [0, 1]")
    if c < 0:
        raise ValueError(f"kl_inverse_upper: c={c} must be >= 0")
    lo, hi = q, 1.0
    if kl_bernoulli(q, hi) <= c:
        return 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kl_bernoulli(q, mid) <= c else (lo, mid)
    return hi


def binomial_tail_inversion(errors: int, n: int, delta: float) -> float:
    """max{p : P[Binomial(n, p) <= errors] >= delta} (Langford 2005), via the incomplete beta function."""
    if not 0 <= errors <= n or n <= 0:
        raise ValueError(f"binomial_tail_inversion: need 0 <= errors={errors} <= n={n}, n > 0")
    if errors == n:
        return 1.0
    from scipy.special import betaincinv  # lazy: scipy would add ~0.5 s to `import frugalrt.nn`

    # P[Bin(n, p) <= k] = I_{1-p}(n - k, k + 1), decreasing in p.
    return float(1.0 - betaincinv(n - errors, errors + 1, delta))


@dataclass
class Certificate:
    """An upper bound on the 0-1 risk of a predictor, holding with probability >= 1 - confidence_loss.

    ``kind`` is "stochastic" (the posterior's Gibbs predictor) or "deterministic" (one fixed network);
    ``name`` the bound (:data:`BOUNDS`), ``method`` its references. ``empirical_risk`` is the error
    measured on the n examples (Monte Carlo estimate for the stochastic predictor). ``delta`` and
    ``delta_mc`` are totals: with ``union`` > 1 (settings compared) and ``candidates`` > 1 (networks
    drawn, the best kept) each was split evenly over them. ``data_dependent_prior``, ``splits`` (sizes
    of the prior, bound and test splits) and ``prior_only_bound`` (the same bound for Q = P) are
    filled in by the caller that knows them.
    """

    kind: str
    bound: float
    empirical_risk: float
    n: int
    delta: float
    classes: int
    kl: Optional[float] = None
    mc_samples: Optional[int] = None
    delta_mc: Optional[float] = None
    empirical_risk_bound: Optional[float] = None
    union: int = 1
    method: str = ""
    name: str = ""
    log_density_ratio: Optional[float] = None
    candidates: int = 1
    data_dependent_prior: Optional[bool] = None
    splits: dict = field(default_factory=dict)
    prior_only_bound: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def trivial(self) -> float:
        """Error of guessing uniformly among the classes: a bound above it says nothing."""
        return 1.0 - 1.0 / self.classes

    @property
    def vacuous(self) -> bool:
        return self.bound >= min(1.0, self.trivial)

    @property
    def confidence_loss(self) -> float:
        return self.delta + (self.delta_mc or 0.0)

    def to_json(self) -> str:
        data = asdict(self)
        data.update(vacuous=self.vacuous, trivial=self.trivial, confidence=1.0 - self.confidence_loss)
        return json.dumps(data, sort_keys=True)

    def __str__(self) -> str:
        status = "VACUOUS" if self.vacuous else "non-vacuous"
        parts = [f"{self.kind} 0-1 risk <= {self.bound:.4f} ({status}, trivial {self.trivial:.3f})",
                 f"with prob. >= {1 - self.confidence_loss:.3f}", f"empirical {self.empirical_risk:.4f}",
                 f"n={self.n}"]
        if self.kl is not None:
            parts.append(f"KL={self.kl:.2f}")
        if self.log_density_ratio is not None:
            parts.append(f"ln dQ/dP={self.log_density_ratio:.2f} (best of {self.candidates} draws)")
        if self.mc_samples is not None:
            parts.append(f"MC m={self.mc_samples} (empirical risk <= {self.empirical_risk_bound:.4f})")
        return ", ".join(parts)


def pac_bayes_kl_bound(empirical_risk: float, kl: float, n: int, delta: float) -> float:
    """Maurer's PAC-Bayes-kl bound: kl^-1(R_S, (KL + ln(2 sqrt(n) / delta)) / n)."""
    return kl_inverse_upper(empirical_risk, (kl + math.log(2.0 * math.sqrt(n) / delta)) / n)


def stochastic_certificate(mc_errors: np.ndarray, kl: float, n: int, classes: int, delta: float,
                           delta_mc: float, union: int = 1, mc_count: Optional[int] = None) -> Certificate:
    """Certificate from per-draw empirical error rates ``mc_errors`` on the n examples.

    ``mc_count`` is the number of independent [0, 1] samples whose mean estimates R_S(Q): the number
    of draws when a draw is one network evaluated on all n examples (Pérez-Ortiz et al.), draws * n
    when every (draw, example) pair gets its own network. ``union`` = number of hyper-parameter
    settings the posterior was selected from: both terms pay for it, with delta / union and
    delta_mc / union (union bound), so ``delta`` and ``delta_mc`` stay the totals: the certificate
    holds with probability >= 1 - delta - delta_mc, as ``confidence`` in its JSON states."""
    m = int(mc_count or len(mc_errors))
    risk = float(np.mean(mc_errors))
    risk_bound = kl_inverse_upper(risk, math.log(2.0 / (delta_mc / union)) / m)
    bound = pac_bayes_kl_bound(risk_bound, kl, n, delta / union)
    return Certificate("stochastic", bound, risk, n, delta, classes, kl=float(kl), mc_samples=m,
                       delta_mc=delta_mc, empirical_risk_bound=risk_bound, union=union, name=BOUNDS[0],
                       method="PAC-Bayes-kl (Maurer 2004) + kl-Chernoff bound on the Monte Carlo estimate "
                              "(Langford & Caruana 2001; Hoeffding 1963)",
                       extra={"draws": int(len(mc_errors))})


def disintegrated_certificate(errors: int, n: int, log_density_ratio: float, classes: int, delta: float,
                              union: int = 1, candidates: int = 1) -> Certificate:
    """Bound for one network h drawn from Q with ``errors`` mistakes on the n bound examples:
    ``kl^-1(errors / n, (ln dQ/dP(h) + ln(2 sqrt(n) / delta')) / n)``, delta' = delta / (union *
    candidates) when ``candidates`` draws were certified and the best kept (union bound). A right-hand
    side below 0 cannot hold (kl >= 0): that draw fell in the failure event and gets the bound 1."""
    c = (log_density_ratio + math.log(2.0 * math.sqrt(n) * union * candidates / delta)) / n
    bound = kl_inverse_upper(errors / n, c) if c >= 0 else 1.0
    return Certificate("deterministic", bound, errors / n, n, delta, classes, union=union, name=BOUNDS[1],
                       log_density_ratio=float(log_density_ratio), candidates=int(candidates),
                       method="disintegrated PAC-Bayes-kl on a posterior draw (Rivasplata et al. 2020, Th. 1(i); "
                              "Maurer 2004)")


def held_out_certificate(errors: int, n: int, classes: int, delta: float, union: int = 1) -> Certificate:
    """Held-out bound for a fixed (deterministic) predictor with ``errors`` mistakes on n examples;
    ``union`` = number of predictors whose test errors were looked at (delta / union)."""
    return Certificate("deterministic", binomial_tail_inversion(errors, n, delta / union), errors / n, n, delta,
                       classes, union=union, name=BOUNDS[2],
                       method="binomial tail inversion on a held-out set (Langford 2005; Clopper-Pearson)")
