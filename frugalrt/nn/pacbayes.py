"""PAC-Bayes training of binary-activated networks whose deterministic twin exports frugally.

The network (after PBGNet, Letarte et al., NeurIPS 2019) has sign activations everywhere:

* :class:`GaussianSignLinear` (first layer, real inputs): W ~ N(mu, sigma^2 I) over ``[x; 1]``; given x
  the units are independent and ``P[sign(W x) = +1] = Phi(mu.x / (sigma ||x||))`` exactly (PBGNet's
  erf expectation). Its deterministic twin is ``nn.Linear(mu)`` (a standard Gemm; the next layer
  binarizes its input).
* :class:`BernoulliBinaryLinear` (deeper layers): *binary* weights s ~ Bernoulli(sigmoid(theta)) on
  {-1, +1} and a Gaussian bias b ~ N(mu_b, sigma_b^2); output ``sum_j s_kj a_j + b_k``, then sign (or
  argmax for the output layer). KL(Q||P) is the exact Bernoulli KL plus the Gaussian bias KL. Its
  deterministic twin is a frozen :class:`BinaryLinear` with weights sign(theta), scale 1 and bias mu_b
  (``ai.frugalrt::BinaryGemm``: integer XNOR-popcount sums, exact in float32).

Training minimizes the PAC-Bayes bound (Maurer/McAllester "classic" form,
``risk + sqrt((KL + ln(2 sqrt(n)/delta)) / 2n)``) with a surrogate risk: the bounded cross-entropy
of Pérez-Ortiz et al. (JMLR 2021) on logits drawn from a moment-matched Gaussian (each layer's
pre-activation mean and variance given the previous layer's activation means, as in expectation
backpropagation, Soudry et al. 2014; exact for the first layer). The surrogate only steers training:
the certificate (:func:`certify`) samples the *exact* stochastic network.

Prior: data-dependent, as in Pérez-Ortiz et al.: train the same model on a prior split by plain
surrogate-risk minimization, :meth:`BinaryActivatedNet.set_prior`, then train the posterior (started
at the prior) on the bound split. The certificate is valid on the bound split only (independent of
the prior). No hyper-parameter is selected by the bound here; if you select among k settings pass
``union=k`` to :func:`certify` (delta / k, union bound).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from frugalrt.nn.binary import BinaryLinear
from frugalrt.nn.certify import Certificate, held_out_certificate, stochastic_certificate

_SQRT2 = math.sqrt(2.0)


def _with_ones(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


class GaussianSignLinear(nn.Module):
    """sign(W [x; 1]) with W ~ N(mu, sigma^2 I): a PBGNet first layer on real inputs."""

    def __init__(self, in_features: int, out_features: int, sigma: float = 1.0):
        super().__init__()
        self.in_features, self.out_features, self.sigma = int(in_features), int(out_features), float(sigma)
        self.mu = nn.Parameter(torch.randn(out_features, in_features + 1) / math.sqrt(in_features + 1))
        self.register_buffer("prior_mu", self.mu.detach().clone())

    def activation_mean(self, x: Tensor) -> Tensor:
        """E[sign(W x~)] = erf(mu.x~ / (sqrt 2 sigma ||x~||)), exact."""
        xt = _with_ones(x)
        return torch.erf(xt @ self.mu.T.to(xt.dtype) / (_SQRT2 * self.sigma * xt.norm(dim=-1, keepdim=True)))

    def sample(self, x: Tensor, draws: int, generator: torch.Generator) -> Tensor:
        """[draws, batch, out] activations, an independent network per (draw, example): exact."""
        p = (1 + self.activation_mean(x)) / 2
        u = torch.rand((draws, *p.shape), generator=generator, dtype=p.dtype)
        return torch.where(u < p, 1.0, -1.0).to(p.dtype)

    def kl(self) -> Tensor:
        return ((self.mu.double() - self.prior_mu.double()) ** 2).sum() / (2 * self.sigma ** 2)

    def deterministic(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features)
        with torch.no_grad():
            lin.weight.copy_(self.mu[:, :-1])
            lin.bias.copy_(self.mu[:, -1])
        return lin


class BernoulliBinaryLinear(nn.Module):
    """sum_j s_kj a_j + b_k, s_kj in {-1,+1} with P[s = +1] = sigmoid(theta), b ~ N(mu_b, sigma_b^2)."""

    def __init__(self, in_features: int, out_features: int, sigma_bias: float = 1.0):
        super().__init__()
        self.in_features, self.out_features, self.sigma_bias = int(in_features), int(out_features), float(sigma_bias)
        self.theta = nn.Parameter(torch.randn(out_features, in_features) * 0.1)
        self.bias_mu = nn.Parameter(torch.zeros(out_features))
        self.register_buffer("prior_theta", self.theta.detach().clone())
        self.register_buffer("prior_bias_mu", self.bias_mu.detach().clone())

    def moments(self, a_mean: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of the pre-activation given independent +-1 inputs of mean ``a_mean``."""
        w = torch.tanh(self.theta / 2)  # E[s] = 2 sigmoid(theta) - 1
        mean = a_mean @ w.T + self.bias_mu
        var = self.in_features - (a_mean ** 2) @ (w ** 2).T + self.sigma_bias ** 2
        return mean, var

    def sample(self, a: Tensor, generator: torch.Generator) -> Tensor:
        """Pre-activations for ``a`` [draws, batch, in], fresh weights per (draw, example): exact."""
        q = torch.sigmoid(self.theta).to(a.dtype)
        u = torch.rand((*a.shape[:2], *q.shape), generator=generator, dtype=a.dtype)
        s = torch.where(u < q, 1.0, -1.0).to(a.dtype)
        b = self.bias_mu.to(a.dtype) + self.sigma_bias * torch.randn((*a.shape[:2], self.out_features),
                                                                     generator=generator, dtype=a.dtype)
        return torch.einsum("dbki,dbi->dbk", s, a) + b

    def kl(self) -> Tensor:
        t, t0 = self.theta.double(), self.prior_theta.double()
        q = torch.sigmoid(t)
        bern = q * (F.logsigmoid(t) - F.logsigmoid(t0)) + (1 - q) * (F.logsigmoid(-t) - F.logsigmoid(-t0))
        gauss = ((self.bias_mu.double() - self.prior_bias_mu.double()) ** 2).sum() / (2 * self.sigma_bias ** 2)
        return bern.sum() + gauss

    def deterministic(self) -> BinaryLinear:
        """Frozen BinaryLinear computing sum_j sign(theta_kj) a_j + mu_b exactly (scale fixed to 1)."""
        lin = BinaryLinear(self.in_features, self.out_features)
        with torch.no_grad():
            lin.weight.copy_(torch.where(self.theta >= 0, 1.0, -1.0))
            lin.bias.copy_(self.bias_mu)
        lin.freeze()
        lin.weight_scale_.fill_(1.0)
        return lin


class BinaryActivatedNet(nn.Module):
    """Gaussian first layer, then Bernoulli binary-weight layers; the last one gives class scores."""

    def __init__(self, in_features: int, hidden: Sequence[int], classes: int, sigma: float = 1.0,
                 sigma_bias: float = 1.0):
        super().__init__()
        self.classes = int(classes)
        self.first = GaussianSignLinear(in_features, hidden[0], sigma)
        sizes = list(hidden) + [classes]
        self.binary = nn.ModuleList(BernoulliBinaryLinear(i, o, sigma_bias) for i, o in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """Surrogate logits for training: one draw from the moment-matched Gaussian output."""
        a = self.first.activation_mean(x)
        for layer in self.binary[:-1]:
            mean, var = layer.moments(a)
            a = torch.erf(mean / torch.sqrt(2 * var))
        mean, var = self.binary[-1].moments(a)
        return mean + torch.sqrt(var) * torch.randn_like(mean)

    def kl(self) -> Tensor:
        return self.first.kl() + sum(layer.kl() for layer in self.binary)

    @torch.no_grad()
    def set_prior(self) -> None:
        """Make the current parameters the prior (call after training on the prior split)."""
        self.first.prior_mu.copy_(self.first.mu)
        for layer in self.binary:
            layer.prior_theta.copy_(layer.theta)
            layer.prior_bias_mu.copy_(layer.bias_mu)

    @torch.no_grad()
    def sample_predictions(self, x: Tensor, draws: int, generator: torch.Generator) -> Tensor:
        """[draws, batch] class predictions of the exact stochastic network (independent draws)."""
        a = self.first.sample(x.double(), draws, generator)
        for layer in self.binary[:-1]:
            a = torch.where(layer.sample(a, generator) >= 0, 1.0, -1.0).double()
        return self.binary[-1].sample(a, generator).argmax(dim=-1)

    def deterministic(self) -> nn.Sequential:
        """The exported network: Linear(mu) -> BinaryLinear(s) with sign(theta) weights.

        BinaryLinear binarizes its inputs, so the sign activations are implicit (sign(0) = +1 as in
        the stochastic network). Output: class scores (argmax = prediction).
        """
        return nn.Sequential(self.first.deterministic(), *(layer.deterministic() for layer in self.binary))


def bounded_cross_entropy(logits: Tensor, y: Tensor, p_min: float = 1e-4) -> Tensor:
    """Cross-entropy with probabilities clamped at p_min, divided by ln(1/p_min): a loss in [0, 1]."""
    logp = F.log_softmax(logits, dim=-1).gather(-1, y[:, None]).squeeze(-1)
    return (-logp.clamp(min=math.log(p_min))).mean() / math.log(1 / p_min)


def pac_bayes_objective(risk: Tensor, kl: Tensor, n: int, delta: float) -> Tensor:
    """risk + sqrt((KL + ln(2 sqrt(n) / delta)) / 2n): the 'classic' relaxation of the kl bound."""
    return risk + torch.sqrt((kl + math.log(2 * math.sqrt(n) / delta)) / (2 * n))


def fit(model: BinaryActivatedNet, x: Tensor, y: Tensor, epochs: int, *, lr: float = 1e-2,
        batch_size: int = 128, delta: Optional[float] = None, seed: int = 0) -> list[float]:
    """Minimize the surrogate risk (``delta=None``, e.g. to learn the prior) or the PAC-Bayes bound
    with n = len(x) (``delta`` given). Returns the per-epoch mean objective."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        perm, total = torch.randperm(len(x), generator=gen), 0.0
        for idx in perm.split(batch_size):
            loss = bounded_cross_entropy(model(x[idx]), y[idx])
            if delta is not None:
                loss = pac_bayes_objective(loss, model.kl().float(), len(x), delta)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(x))
    return history


def stochastic_error_rates(model: BinaryActivatedNet, x: Tensor, y: Tensor, draws: int, seed: int = 0) -> np.ndarray:
    """Per-draw error rates of the stochastic predictor (fresh network per draw and example)."""
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, 2 ** 23 // (len(x) * max(layer.theta.numel() for layer in model.binary)))  # ~64 MiB of weights
    rates = [(model.sample_predictions(x, min(chunk, draws - i), gen) != y).double().mean(dim=1)
             for i in range(0, draws, chunk)]
    return torch.cat(rates).numpy()


def certify(model: BinaryActivatedNet, data: tuple[Tensor, Tensor], delta: float = 0.025, *,
            draws: int = 50, delta_mc: float = 0.01, union: int = 1, seed: int = 0) -> Certificate:
    """Risk certificate of the stochastic predictor on ``data`` = (x, y), the bound split (independent
    of the prior). Each of ``draws`` rounds draws a fresh network per example, so the draws x n error
    indicators are independent with mean R_S(Q): Hoeffding's kl-Chernoff bound (1963, independent,
    not identically distributed) bounds R_S(Q) with draws * n samples; then PAC-Bayes-kl."""
    x, y = data
    rates = stochastic_error_rates(model, x, y, draws, seed)
    with torch.no_grad():
        kl = model.kl().item()
    return stochastic_certificate(rates, kl, len(y), model.classes, delta, delta_mc, union, mc_count=draws * len(y))


def deterministic_certificate(model: nn.Module, data: tuple[Tensor, Tensor], delta: float = 0.05,
                              classes: Optional[int] = None, union: int = 1) -> Certificate:
    """Held-out bound of the exact network ``model`` (e.g. ``net.deterministic()``) on test data;
    ``union``: how many candidate networks had their test error looked at (delta / union)."""
    x, y = data
    with torch.no_grad():
        scores = model(x.float())
    errors = int((scores.argmax(dim=-1) != y).sum())
    return held_out_certificate(errors, len(y), classes or scores.shape[-1], delta, union)
