"""PAC-Bayes training of binary-activated networks whose deployed network exports frugally.

Posterior Q and prior P are Gaussians with *learned* means and standard deviations over every
weight (PBB, Pérez-Ortiz et al., JMLR 2021); the network has sign activations (PBGNet, Letarte et
al., NeurIPS 2019) and one real-valued layer first:

* :class:`GaussianLinear` (``nn.Linear``): given x, ``y_k = w_k.x + b_k`` is Gaussian, so
  ``P[sign(y_k) = +1] = Phi(mean_k / std_k)`` is exact (PBGNet's closed form).
* :class:`GaussianButterfly` (``ButterflyLinear``, Gaussian twiddles): a product of random stages is
  not Gaussian, but given the first L-1 stages the last is linear in its own twiddles: the surrogate
  samples those stages and integrates the last one in closed form.
* :class:`GaussianBinaryLinear` (``BinaryLinear``): a Gaussian over the latent float weights; only
  s = sign(W) ~ Bernoulli(Phi(mu / sigma)) reaches the output, so KL and densities are those of the
  signs (<= the Gaussian KL by data processing). Pre-activations ``sum_j s_kj a_j + b_k``.
* :class:`GaussianBinaryConv2d` (``BinaryConv2d``): the same over a convolution's latent weights;
  one network's signs are shared by all positions of an image, and padded taps contribute 0 (or,
  with ``pad_value=1``, read a +1 input, as ``BinaryConv2d``'s one-padding does).
  :class:`BinaryActivatedConvNet` stacks them on an image, then ``GaussianBinaryLinear`` layers.

Training minimizes fclassic, fquad or flamb (:data:`OBJECTIVES`) with a surrogate risk computed from
the class scores' means and variances, propagated layer by layer (Soudry et al. 2014; exact for a
first ``GaussianLinear``): ``"zero_one"``, P[argmax != y] for Gaussian scores (the certificate's own
loss), or PBB's bounded cross-entropy on one draw of the scores. The surrogate only steers training:
:func:`certify` samples the exact stochastic network. The prior is data-dependent: the same model
trained on its own split (e.g. the means by cross-entropy, sigmas fixed, as PBB), then
:meth:`BinaryActivatedNet.set_prior`; the posterior starts there and is trained on the bound split.
:func:`deploy` draws the network that ships and certifies it (disintegrated bound, docs/pacbayes.md).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.special import log_ndtr, ndtr

from frugalrt.nn import ops
from frugalrt.nn.binary import BinaryConv2d, BinaryLinear, _Binary, _pair
from frugalrt.nn.butterfly import ButterflyLinear
from frugalrt.nn.certify import Certificate, disintegrated_certificate, held_out_certificate, stochastic_certificate

_SQRT2 = math.sqrt(2.0)


class GaussianParameter(nn.Module):
    """N(mu, sigma^2) per entry of one weight tensor, and its prior N(mu_p, sigma_p^2).

    Learned in the prior's units: ``mu = mu_p + sigma_p * shift``, ``sigma = sigma_p * exp(log_scale)``.
    KL(Q||P) then depends on (shift, log_scale) only, and an optimizer step of a given size costs the
    same KL whatever the prior's scale (Adam's steps are ~lr per entry: in raw units a step of 0.01 on
    a weight whose prior sigma is 0.001 would cost 50 nats per entry).
    """

    def __init__(self, mean: Tensor, sigma: float):
        super().__init__()
        self.register_buffer("prior_mu", mean.detach().clone().float())
        self.register_buffer("prior_log_sigma", torch.full_like(self.prior_mu, math.log(sigma)))
        self.shift = nn.Parameter(torch.zeros_like(self.prior_mu))
        self.log_scale = nn.Parameter(torch.zeros_like(self.prior_mu))

    @property
    def mu(self) -> Tensor:
        return self.prior_mu + self.prior_log_sigma.exp() * self.shift

    @property
    def sigma(self) -> Tensor:
        return (self.prior_log_sigma + self.log_scale).exp()

    def kl(self) -> Tensor:
        """sum KL(N(mu, s^2) || N(mu_p, s_p^2)) = sum (shift^2 + e^(2 log_scale) - 1) / 2 - log_scale, float64."""
        shift, log_scale = self.shift.double(), self.log_scale.double()
        return ((shift ** 2 + torch.exp(2 * log_scale) - 1) / 2 - log_scale).sum()

    def rsample(self, prefix: Sequence[int] = (), generator: Optional[torch.Generator] = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
        """mu + sigma eps, differentiable in (mu, sigma) (reparametrization trick)."""
        eps = torch.randn((*prefix, *self.prior_mu.shape), generator=generator, dtype=dtype)
        return self.mu.to(dtype) + self.sigma.to(dtype) * eps

    def log_ratio(self, w: Tensor) -> float:
        """ln q(w) / p(w) at a draw w (float64)."""
        with torch.no_grad():
            w, lp = w.double(), self.prior_log_sigma.double()
            lq = lp + self.log_scale.double()
            zq, zp = (w - self.mu.double()) / lq.exp(), (w - self.prior_mu.double()) / lp.exp()
            return float((lp - lq - (zq ** 2 - zp ** 2) / 2).sum())

    @torch.no_grad()
    def set_prior(self) -> None:
        """The current posterior becomes the prior (and the posterior starts there)."""
        self.prior_mu.copy_(self.mu)
        self.prior_log_sigma.add_(self.log_scale)
        self.reset_to_prior()

    @torch.no_grad()
    def reset_to_prior(self) -> None:
        self.shift.zero_()
        self.log_scale.zero_()


class _StochasticLayer(nn.Module):
    """Shared by the layers: parameters ``weight`` and ``bias`` (GaussianParameter)."""

    def kl(self) -> Tensor:
        return self.weight.kl() + self.bias.kl()

    def draw(self, generator: torch.Generator) -> dict[str, Tensor]:
        """One network's parameters, float64."""
        return {"weight": self.weight.rsample((), generator, torch.float64).detach(),
                "bias": self.bias.rsample((), generator, torch.float64).detach()}

    def log_ratio(self, drawn: dict[str, Tensor]) -> float:
        return self.weight.log_ratio(drawn["weight"]) + self.bias.log_ratio(drawn["bias"])


class GaussianLinear(_StochasticLayer):
    """``y = W x + b``, W and b Gaussian; the first layer (real inputs). Deploys as ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, sigma: float = 0.05):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = GaussianParameter(torch.randn(out_features, in_features) / math.sqrt(in_features), sigma)
        self.bias = GaussianParameter(torch.zeros(out_features), sigma)

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of y given x: exact (y is Gaussian)."""
        mean = x @ self.weight.mu.T.to(x.dtype) + self.bias.mu.to(x.dtype)
        var = (x * x) @ (self.weight.sigma ** 2).T.to(x.dtype) + (self.bias.sigma ** 2).to(x.dtype)
        return mean, var

    def sample(self, x: Tensor, draws: int, generator: torch.Generator) -> Tensor:
        """[draws, batch, out] pre-activations, a fresh network per (draw, example): given x the units are
        independent Gaussians (distinct weights), so sampling them from their moments is exact."""
        with torch.no_grad():
            mean, var = self.moments(x.double())
        return mean + var.sqrt() * torch.randn((draws, *mean.shape), generator=generator, dtype=mean.dtype)

    def deploy(self, drawn: Optional[dict[str, Tensor]] = None) -> nn.Linear:
        """``nn.Linear`` with the drawn weights (posterior means if ``drawn`` is None)."""
        w, b = (drawn["weight"], drawn["bias"]) if drawn else (self.weight.mu, self.bias.mu)
        lin = nn.Linear(self.in_features, self.out_features)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        return lin


def butterfly_stages(y: Tensor, twiddles: Tensor, start: int, stop: int) -> Tensor:
    """Stages ``start..stop-1`` of the butterfly (docs/ops.md, as ``ops.butterfly_dense_path``) on
    y [..., N]; ``twiddles`` [..., L, N/2, 2, 2] may carry per-row leading dims (one network per row)."""
    n = y.shape[-1]
    for s in range(start, stop):
        h = 1 << s
        v = y.reshape(*y.shape[:-1], n // (2 * h), 2, h)
        t = twiddles[..., s, :, :, :].reshape(*twiddles.shape[:-4], n // (2 * h), h, 2, 2)
        x0, x1 = v[..., 0, :], v[..., 1, :]
        y = torch.stack([t[..., 0, 0] * x0 + t[..., 0, 1] * x1, t[..., 1, 0] * x0 + t[..., 1, 1] * x1], dim=-2)
        y = y.reshape(*y.shape[:-3], n)
    return y


class GaussianButterfly(_StochasticLayer):
    """``ButterflyLinear`` with Gaussian twiddles and bias; deploys as ``ButterflyLinear``."""

    def __init__(self, in_features: int, out_features: int, sigma: float = 0.05):
        super().__init__()
        ref = ButterflyLinear(in_features, out_features)
        self.in_features, self.out_features, self.n, self.stages = ref.in_features, ref.out_features, ref.n, ref.stages
        self.weight = GaussianParameter(ref.twiddles.detach(), sigma)
        self.bias = GaussianParameter(ref.bias.detach(), sigma)

    def _pad(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, self.n - self.in_features))

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of y given x and a draw of stages 0..L-2 (one per example, reparametrized):
        the last stage and the bias are linear in their own Gaussian parameters, so given the rest y
        is Gaussian and ``P[sign(y) = +1]`` is exact; averaged over the draws, unbiased."""
        tw = self.weight.rsample((x.shape[0],), dtype=x.dtype)
        u = butterfly_stages(self._pad(x), tw, 0, self.stages - 1)
        last = self.stages - 1
        mean = butterfly_stages(u, self.weight.mu.to(x.dtype), last, self.stages)[:, :self.out_features]
        var = butterfly_stages(u * u, (self.weight.sigma ** 2).to(x.dtype), last, self.stages)[:, :self.out_features]
        return mean + self.bias.mu.to(x.dtype), var + (self.bias.sigma ** 2).to(x.dtype)

    def sample(self, x: Tensor, draws: int, generator: torch.Generator) -> Tensor:
        """[draws, batch, out] pre-activations with fresh twiddles and bias per (draw, example): exact."""
        with torch.no_grad():
            tw = self.weight.rsample((draws, x.shape[0]), generator, torch.float64)
            y = butterfly_stages(self._pad(x.double()), tw, 0, self.stages)[..., :self.out_features]
            return y + self.bias.rsample((draws, x.shape[0]), generator, torch.float64)

    def deploy(self, drawn: Optional[dict[str, Tensor]] = None) -> ButterflyLinear:
        tw, b = (drawn["weight"], drawn["bias"]) if drawn else (self.weight.mu, self.bias.mu)
        layer = ButterflyLinear(self.in_features, self.out_features)
        with torch.no_grad():
            layer.twiddles.copy_(tw)
            layer.bias.copy_(b)
        return layer


class _GaussianSigns(_StochasticLayer):
    """Shared by the binary layers: latent W ~ N(mu, sigma^2), weights s = sign(W), so P[s = +1] =
    Phi(mu / sigma) independently; Gaussian bias. KL and log-densities are those of the signs (the
    output depends on W only through them)."""

    def _t(self, prior: bool = False) -> Tensor:
        """mu / sigma (posterior or prior): P[s = +1] = Phi(t)."""
        w = self.weight
        return (w.prior_mu / w.prior_log_sigma.exp()) if prior else (w.mu / w.sigma)

    def sign_probability(self) -> Tensor:
        """q = P[s = +1] = Phi(mu / sigma)."""
        return ndtr(self._t())

    def _draw_signs(self, prefix: Sequence[int], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        """Independent signs [*prefix, *weight shape], P[+1] = q."""
        q = self.sign_probability().to(dtype)
        return torch.where(torch.rand((*prefix, *q.shape), generator=generator, dtype=dtype) < q, 1.0, -1.0).to(dtype)

    def kl(self) -> Tensor:
        """KL between the Bernoulli sign distributions (stable log Phi) plus the bias's Gaussian KL."""
        t, t0 = self._t().double(), self._t(prior=True).double()
        q = ndtr(t)
        signs = q * (log_ndtr(t) - log_ndtr(t0)) + (1 - q) * (log_ndtr(-t) - log_ndtr(-t0))
        return signs.sum() + self.bias.kl()

    def draw(self, generator: torch.Generator) -> dict[str, Tensor]:
        drawn = super().draw(generator)
        drawn["weight"] = torch.where(drawn["weight"] >= 0, 1.0, -1.0).double()  # only the signs matter
        return drawn

    def log_ratio(self, drawn: dict[str, Tensor]) -> float:
        with torch.no_grad():  # t in float64, as the draw's latent mu + sigma eps
            w, s = self.weight, drawn["weight"].double()
            t, t0 = w.mu.double() / w.sigma.double(), w.prior_mu.double() / w.prior_log_sigma.double().exp()
            signs = (log_ndtr(s * t) - log_ndtr(s * t0)).sum()  # P[s] = Phi(s mu / sigma)
        return float(signs) + self.bias.log_ratio(drawn["bias"])

    def _frozen(self, layer: _Binary, drawn: Optional[dict[str, Tensor]]) -> _Binary:
        """``layer`` with the drawn signs and bias (signs of mu if not drawn), frozen, scale 1."""
        w, b = (drawn["weight"], drawn["bias"]) if drawn else (self.weight.mu, self.bias.mu)
        with torch.no_grad():
            layer.weight.copy_(torch.where(w >= 0, 1.0, -1.0))
            layer.bias.copy_(b)
        layer.freeze()
        layer.weight_scale_.fill_(1.0)
        return layer


class GaussianBinaryLinear(_GaussianSigns):
    """``BinaryLinear`` (scale 1) on +-1 inputs: latent W ~ N(mu, sigma^2), weights s = sign(W), so
    P[s = +1] = Phi(mu / sigma) independently; Gaussian bias. KL and log-densities are those of the
    signs (the output depends on W only through them)."""

    def __init__(self, in_features: int, out_features: int, sigma: float = 1.0, sigma_bias: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = GaussianParameter(0.1 * torch.randn(out_features, in_features), sigma)
        self.bias = GaussianParameter(torch.zeros(out_features), sigma_bias)

    def moments(self, a_mean: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of the pre-activation given independent +-1 inputs of mean ``a_mean``."""
        w = torch.erf(self._t() / _SQRT2).to(a_mean.dtype)  # E[s] = 2 Phi - 1
        mean = a_mean @ w.T + self.bias.mu.to(a_mean.dtype)
        var = self.in_features - (a_mean ** 2) @ (w ** 2).T + (self.bias.sigma ** 2).to(a_mean.dtype)
        return mean, var

    def sample(self, a: Tensor, generator: torch.Generator) -> Tensor:
        """Pre-activations for ``a`` [draws, batch, in], fresh weights per (draw, example): exact."""
        with torch.no_grad():
            s = self._draw_signs(a.shape[:2], generator, a.dtype)
            b = self.bias.rsample(a.shape[:2], generator, a.dtype)
            return torch.einsum("dbki,dbi->dbk", s, a) + b

    def deploy(self, drawn: Optional[dict[str, Tensor]] = None) -> BinaryLinear:
        """Frozen ``BinaryLinear``: sum_j s_kj sign(a_j) + b_k exactly (scale 1; signs of mu if not drawn)."""
        return self._frozen(BinaryLinear(self.in_features, self.out_features), drawn)


class GaussianBinaryConv2d(_GaussianSigns):
    """``BinaryConv2d`` (scale 1, NCHW, stride and zero padding) on +-1 inputs: latent W [out, in, kh, kw]
    ~ N(mu, sigma^2), weights s = sign(W), P[s = +1] = Phi(mu / sigma) independently; Gaussian bias.
    KL and log-densities are those of the signs. Pre-activation at an output position:
    ``sum over in-image taps of s a + b`` (a padded tap contributes 0, as in ``BinaryConv2d``; with
    ``pad_value=1`` it is a deterministic input a = +1, so every formula below holds on the padded
    input); one network's signs are shared by every position of the image."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 sigma: float = 1.0, sigma_bias: float = 1.0, pad_value: int = 0):
        super().__init__()
        if pad_value not in (0, 1):
            raise ValueError(f"GaussianBinaryConv2d: pad_value must be 0 or 1, got {pad_value!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        self.pad_value = int(pad_value)
        latent = 0.1 * torch.randn(self.out_channels, self.in_channels, *self.kernel_size)
        self.weight = GaussianParameter(latent, sigma)
        self.bias = GaussianParameter(torch.zeros(self.out_channels), sigma_bias)

    def output_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """[out_channels, OH, OW] of an input image of that size."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return self.out_channels, (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1

    def _conv(self, a: Tensor, w: Tensor, groups: int = 1) -> Tensor:
        if self.pad_value:  # padded taps are inputs fixed at +1 (mean 1, square 1)
            ph, pw = self.padding
            return F.conv2d(F.pad(a, (pw, pw, ph, ph), value=1.0), w, stride=self.stride, groups=groups)
        return F.conv2d(a, w, stride=self.stride, padding=self.padding, groups=groups)  # zero padding

    def moments(self, a_mean: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of each pre-activation given independent +-1 inputs of mean ``a_mean``
        [batch, in, H, W]: the in-image taps' terms s a are independent +-1 variables of mean E[s] E[a]
        (distinct weights, distinct inputs), so the variance is (number of in-image taps) - sum (E[s]
        E[a])^2 + sigma_b^2; padded taps add nothing to either (``pad_value=1``: they count, with a = +1)."""
        w = torch.erf(self._t() / _SQRT2).to(a_mean.dtype)  # E[s] = 2 Phi - 1
        bias_mu, bias_var = (v.to(a_mean.dtype).reshape(1, -1, 1, 1) for v in (self.bias.mu, self.bias.sigma ** 2))
        taps = self._conv(torch.ones_like(a_mean[:1]), torch.ones_like(w[:1]))  # [1, 1, OH, OW]
        return self._conv(a_mean, w) + bias_mu, taps - self._conv(a_mean ** 2, w ** 2) + bias_var

    def sample(self, a: Tensor, generator: torch.Generator) -> Tensor:
        """Pre-activations [draws, batch, out, OH, OW] for ``a`` [draws, batch, in, H, W], fresh weights
        per (draw, example), shared by the positions of that image (one network per example): exact."""
        with torch.no_grad():
            draws, batch = a.shape[:2]
            s = self._draw_signs((draws, batch), generator, a.dtype)
            b = self.bias.rsample((draws, batch), generator, a.dtype)
            groups = draws * batch  # one group per (draw, example): its own image and its own network
            z = self._conv(a.reshape(1, groups * self.in_channels, *a.shape[-2:]),
                           s.reshape(groups * self.out_channels, self.in_channels, *self.kernel_size), groups)
            return z.reshape(draws, batch, self.out_channels, *z.shape[-2:]) + b[..., None, None]

    def deploy(self, drawn: Optional[dict[str, Tensor]] = None) -> BinaryConv2d:
        """Frozen ``BinaryConv2d``: conv2d(sign(a), s) + b exactly, padding (``pad_value``) after the sign
        (scale 1; signs of mu if not drawn)."""
        layer = BinaryConv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                             pad_value=self.pad_value)
        return self._frozen(layer, drawn)


@dataclass
class NetworkDraw:
    """One network drawn from the posterior: per-layer parameters (float64) and ln dQ/dP at them."""

    layers: list[dict[str, Tensor]]
    log_ratio: float


class BinaryActivatedNet(nn.Module):
    """A real-valued first layer ("linear" or "butterfly"), then binary layers; the last gives scores."""

    def __init__(self, in_features: int, hidden: Sequence[int], classes: int, *, first: str = "linear",
                 sigma: float = 0.05, sigma_binary: float = 1.0, sigma_bias: float = 1.0):
        super().__init__()
        kinds = {"linear": GaussianLinear, "butterfly": GaussianButterfly}
        if first not in kinds:
            raise ValueError(f"BinaryActivatedNet: first={first!r}, expected one of {sorted(kinds)}")
        self.classes = int(classes)
        self.first = kinds[first](in_features, hidden[0], sigma)
        sizes = list(hidden) + [classes]
        self.binary = nn.ModuleList(GaussianBinaryLinear(i, o, sigma_binary, sigma_bias)
                                    for i, o in zip(sizes[:-1], sizes[1:]))

    def layers(self) -> list[_StochasticLayer]:
        return [self.first, *self.binary]

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Means and variances of the class scores, propagated layer by layer (independent units)."""
        mean, var = self.first.moments(x)
        for layer in self.binary:
            mean, var = layer.moments(torch.erf(mean / torch.sqrt(2 * var)))  # E[sign(y)], y ~ N(mean, var)
        return mean, var

    def forward(self, x: Tensor) -> Tensor:
        """Surrogate logits: one draw from the moment-matched Gaussian output."""
        mean, var = self.moments(x)
        return mean + torch.sqrt(var) * torch.randn_like(mean)

    def kl(self) -> Tensor:
        return sum(layer.kl() for layer in self.layers())

    def set_prior(self) -> None:
        """Make the current posterior the prior (call after training on the prior split)."""
        for p in self.modules():
            if isinstance(p, GaussianParameter):
                p.set_prior()

    def prior_copy(self) -> "BinaryActivatedNet":
        """A copy whose posterior is the prior (KL 0): for the prior-only bound."""
        net = copy.deepcopy(self)
        for p in net.modules():
            if isinstance(p, GaussianParameter):
                p.reset_to_prior()
        return net

    def randoms_per_network(self) -> int:
        """At least the random numbers drawn per (draw, example) by :meth:`sample_predictions`: sizes
        the chunks of draws (changing it would change which numbers each draw gets)."""
        first = self.first.weight.mu.numel() if isinstance(self.first, GaussianButterfly) else 0
        return first + sum(layer.weight.mu.numel() + layer.out_features for layer in self.layers())

    @torch.no_grad()
    def sample_predictions(self, x: Tensor, draws: int, generator: torch.Generator) -> Tensor:
        """[draws, batch] class predictions of the exact stochastic network (fresh per draw and example)."""
        a = torch.where(self.first.sample(x, draws, generator) >= 0, 1.0, -1.0).double()
        for layer in self.binary[:-1]:
            a = torch.where(layer.sample(a, generator) >= 0, 1.0, -1.0).double()
        return self.binary[-1].sample(a, generator).argmax(dim=-1)

    def draw(self, generator: torch.Generator) -> NetworkDraw:
        """One network from the posterior, with its log density ratio ln q(h) / p(h)."""
        layers = [layer.draw(generator) for layer in self.layers()]
        return NetworkDraw(layers, sum(layer.log_ratio(d) for layer, d in zip(self.layers(), layers)))

    def deterministic(self, drawn: Optional[NetworkDraw] = None) -> nn.Sequential:
        """The exportable network of a draw (posterior means / signs of means if None): Linear or
        ButterflyLinear, then frozen BinaryLinear layers (they binarize their inputs: the sign
        activations are implicit, sign(0) = +1). Output: class scores."""
        parts = drawn.layers if drawn else [None] * len(self.layers())
        return nn.Sequential(*(layer.deploy(d) for layer, d in zip(self.layers(), parts))).eval()


class BinaryActivatedConvNet(BinaryActivatedNet):
    """Binary convolutions on an image [channels, height, width], then binary linear layers, sign
    activations between them; the last gives the class scores. Trained, certified and deployed as
    :class:`BinaryActivatedNet` (:func:`fit`, :func:`certify`, :func:`deploy`).

    ``conv``: one ``(out_channels, kernel_size[, stride[, padding]])`` per :class:`GaussianBinaryConv2d`;
    ``hidden``: widths of the binary linear layers after them; ``pad_value``: every convolution's
    (0: padded taps contribute 0; 1: they read +1, see ``BinaryConv2d``). There is no real-valued
    layer: the first convolution binarizes the input (sign(0) = +1), as the deployed ``BinaryConv2d``
    does, so the input should be centered (e.g. pixels in [0, 1] minus 0.5). The surrogate
    (:meth:`moments`) takes the units of a layer as independent, although the positions of a
    convolution share their weights.
    """

    def __init__(self, image_shape: Sequence[int], conv: Sequence[Sequence[int]], hidden: Sequence[int],
                 classes: int, *, sigma_binary: float = 1.0, sigma_bias: float = 1.0, pad_value: int = 0):
        nn.Module.__init__(self)  # no real-valued first layer: BinaryActivatedNet's __init__ does not apply
        if not conv:
            raise ValueError("BinaryActivatedConvNet: conv is empty (use BinaryActivatedNet)")
        self.classes, self.image_shape = int(classes), tuple(int(d) for d in image_shape)
        shape, layers = self.image_shape, []
        for spec in conv:
            if not 2 <= len(spec) <= 4:
                raise ValueError(f"BinaryActivatedConvNet: conv entry {spec!r}, "
                                 "expected (out_channels, kernel_size[, stride[, padding]])")
            out, kernel, stride, padding = (*spec, *(1, 0)[len(spec) - 2:])
            layers.append(GaussianBinaryConv2d(shape[0], out, kernel, stride, padding, sigma_binary, sigma_bias,
                                               pad_value))
            shape = layers[-1].output_shape(*shape[1:])
            if min(shape) < 1:
                raise ValueError(f"BinaryActivatedConvNet: convolution {len(layers)} leaves an empty image {shape}")
        self.conv = nn.ModuleList(layers)
        sizes = [math.prod(shape), *hidden, classes]
        self.binary = nn.ModuleList(GaussianBinaryLinear(i, o, sigma_binary, sigma_bias)
                                    for i, o in zip(sizes[:-1], sizes[1:]))

    def layers(self) -> list[_StochasticLayer]:
        return [*self.conv, *self.binary]

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Means and variances of the class scores; the input's signs are exact (deterministic)."""
        a = ops.sign(x)
        for layer in self.conv:
            mean, var = layer.moments(a)
            a = torch.erf(mean / torch.sqrt(2 * var))  # E[sign(y)], y ~ N(mean, var)
        a = a.flatten(1)
        for layer in self.binary:
            mean, var = layer.moments(a)
            a = torch.erf(mean / torch.sqrt(2 * var))
        return mean, var

    def randoms_per_network(self) -> int:
        return sum(layer.weight.mu.numel() + layer.bias.mu.numel() for layer in self.layers())

    @torch.no_grad()
    def sample_predictions(self, x: Tensor, draws: int, generator: torch.Generator) -> Tensor:
        """[draws, batch] class predictions of the exact stochastic network (fresh per draw and example)."""
        a = ops.sign(x.float()).double().expand(draws, *x.shape)  # the signs the deployed float32 network sees
        for layer in self.conv:
            a = ops.sign(layer.sample(a, generator))
        a = a.flatten(2)
        for layer in self.binary[:-1]:
            a = ops.sign(layer.sample(a, generator))
        return self.binary[-1].sample(a, generator).argmax(dim=-1)

    def deterministic(self, drawn: Optional[NetworkDraw] = None) -> nn.Sequential:
        """The exportable network of a draw (signs of the means if None): frozen ``BinaryConv2d`` layers,
        ``nn.Flatten``, frozen ``BinaryLinear`` layers (each binarizes its input, sign(0) = +1)."""
        parts = drawn.layers if drawn else [None] * len(self.layers())
        convs = [layer.deploy(d) for layer, d in zip(self.conv, parts)]
        linears = [layer.deploy(d) for layer, d in zip(self.binary, parts[len(self.conv):])]
        return nn.Sequential(*convs, nn.Flatten(), *linears).eval()


def bounded_cross_entropy(logits: Tensor, y: Tensor, p_min: float = 1e-4) -> Tensor:
    """Cross-entropy with probabilities clamped at p_min, divided by ln(1/p_min): a loss in [0, 1]."""
    logp = F.log_softmax(logits, dim=-1).gather(-1, y[:, None]).squeeze(-1)
    return (-logp.clamp(min=math.log(p_min))).mean() / math.log(1 / p_min)


_HERMITE = np.polynomial.hermite.hermgauss(24)


def gaussian_zero_one_risk(mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
    """Mean over the batch of P[argmax z != y] for independent z_k ~ N(mean_k, var_k):
    1 - E_t[prod_{k != y} Phi((m_y + s_y t - m_k) / s_k)], t ~ N(0, 1), by Gauss-Hermite quadrature.
    The 0-1 Gibbs risk of the moment-matched output: the certificate's own loss, smooth in the
    parameters (as PBGNet optimizes its bound through a closed-form expected loss)."""
    nodes, weights = (torch.tensor(a, dtype=mean.dtype) for a in _HERMITE)
    std = var.sqrt()
    m_y, s_y = mean.gather(1, y[:, None]), std.gather(1, y[:, None])
    z = (m_y[..., None] + s_y[..., None] * _SQRT2 * nodes - mean[..., None]) / std[..., None]  # [B, K, Q]
    others = (torch.arange(mean.shape[1]) != y[:, None])[..., None]
    p_correct = (torch.exp((log_ndtr(z) * others).sum(dim=1)) * weights).sum(dim=-1) / math.sqrt(math.pi)
    return (1 - p_correct).mean()


RISKS = {"zero_one": lambda model, x, y: gaussian_zero_one_risk(*model.moments(x), y),
         "cross_entropy": lambda model, x, y: bounded_cross_entropy(model(x), y)}


def _complexity(kl: Tensor, n: int, delta: float) -> Tensor:
    return (kl + math.log(2 * math.sqrt(n) / delta)) / n


def fclassic(risk: Tensor, kl: Tensor, n: int, delta: float) -> Tensor:
    """risk + sqrt(c / 2), c = (KL + ln(2 sqrt(n) / delta)) / n: Pinsker's relaxation of kl^-1(risk, c)."""
    return risk + torch.sqrt(_complexity(kl, n, delta) / 2)


def fquad(risk: Tensor, kl: Tensor, n: int, delta: float) -> Tensor:
    """(sqrt(risk + c/2) + sqrt(c/2))^2: the relaxation via kl(q||p) >= (p - q)^2 / 2p (PBB)."""
    half = _complexity(kl, n, delta) / 2
    return (torch.sqrt(risk + half) + torch.sqrt(half)) ** 2


def flamb(risk: Tensor, kl: Tensor, n: int, delta: float) -> Tensor:
    """risk / (1 - l/2) + c / (l (1 - l/2)) at the optimal l in (0, 2) for the current (detached) risk and
    KL (Thiemann et al. 2017: alternating minimization; PBB learns l by SGD instead). At that l it
    equals fquad, value and gradient: both come from kl(q || p) >= (p - q)^2 / 2p."""
    c = _complexity(kl, n, delta)
    lam = 2 / (torch.sqrt(2 * risk.detach() / c.detach() + 1) + 1)
    return risk / (1 - lam / 2) + c / (lam * (1 - lam / 2))


OBJECTIVES = {"fclassic": fclassic, "fquad": fquad, "flamb": flamb}


def fit(model: BinaryActivatedNet, x: Tensor, y: Tensor, epochs: int, *, objective: Optional[str] = "fquad",
        risk: str = "zero_one", delta: float = 0.025, kl_weight: float = 1.0, lr: float = 1e-2,
        learn_sigma: bool = True, batch_size: int = 128, seed: int = 0) -> list[float]:
    """Minimize ``objective`` (:data:`OBJECTIVES`, n = len(x), KL against the model's current prior), or
    the surrogate risk alone (``objective=None``). ``kl_weight`` < 1 scales the KL down: a regularizer
    for learning the prior (its own split is too small to pay the full KL to a data-free prior); a
    posterior is trained with 1, the bound. ``learn_sigma=False`` keeps every sigma (e.g. a prior's
    sigma as a hyper-parameter, as PBB does). Steps are in units of the prior's sigma
    (:class:`GaussianParameter`). Returns the per-epoch mean objective."""
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(f"fit: objective={objective!r}, expected None or one of {sorted(OBJECTIVES)}")
    torch.manual_seed(seed)  # the surrogate's own draws
    gen = torch.Generator().manual_seed(seed)
    params = [p for name, p in model.named_parameters() if learn_sigma or not name.endswith("log_scale")]
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    for _ in range(epochs):
        perm, total = torch.randperm(len(x), generator=gen), 0.0
        for idx in perm.split(batch_size):
            loss = RISKS[risk](model, x[idx], y[idx])
            if objective is not None:
                loss = OBJECTIVES[objective](loss, kl_weight * model.kl().float(), len(x), delta)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(x))
    return history


def stochastic_error_rates(model: BinaryActivatedNet, x: Tensor, y: Tensor, draws: int, seed: int = 0) -> np.ndarray:
    """Per-draw error rates of the stochastic predictor (fresh network per draw and example)."""
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, 2 ** 22 // (len(x) * model.randoms_per_network()))  # ~32 MiB of float64 draws
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


def deploy(model: BinaryActivatedNet, data: tuple[Tensor, Tensor], delta: float = 0.025, *, candidates: int = 10,
           union: int = 1, seed: int = 0) -> tuple[nn.Sequential, Certificate]:
    """Draw ``candidates`` networks from the posterior, certify each on the bound split ``data`` with the
    disintegrated PAC-Bayes-kl bound (delta / (union * candidates) each) and return the exportable
    network with the smallest bound, and that bound. It holds for that exact network, with probability
    >= 1 - delta over the bound split and the draws (docs/pacbayes.md)."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    best = None
    for index in range(candidates):
        drawn = model.draw(gen)
        net = model.deterministic(drawn)
        with torch.no_grad():
            errors = int((net(x.float()).argmax(dim=-1) != y).sum())
        cert = disintegrated_certificate(errors, len(y), drawn.log_ratio, model.classes, delta, union, candidates)
        cert.extra["chosen_draw"] = index
        if best is None or cert.bound < best[1].bound:
            best = (net, cert)
    return best


def deterministic_certificate(model: nn.Module, data: tuple[Tensor, Tensor], delta: float = 0.05,
                              classes: Optional[int] = None, union: int = 1) -> Certificate:
    """Held-out bound of the exact network ``model`` (e.g. :func:`deploy`'s) on test data;
    ``union``: how many candidate networks had their test error looked at (delta / union)."""
    x, y = data
    with torch.no_grad():
        scores = model(x.float())
    errors = int((scores.argmax(dim=-1) != y).sum())
    return held_out_certificate(errors, len(y), classes or scores.shape[-1], delta, union)
