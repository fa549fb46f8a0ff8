"""Each frugal layer against an exact oracle (larq style): float twins on sign()'d tensors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from frugalrt.nn import BinaryConv2d, BinaryLinear, ButterflyLinear, freeze, ops, sign_ste
from frugalrt.nn.ops import pack_bits, sign, unpack_signs


@pytest.mark.parametrize("n_in,n_out,bias", [(16, 16, True), (20, 13, False), (100, 37, True), (5, 64, True)])
def test_butterfly_equals_the_spec_matrix(n_in, n_out, bias, butterfly_matrix):
    """Oracle: the dense matrix of docs/ops.md built by explicit loops from the twiddles (float64)."""
    layer = ButterflyLinear(n_in, n_out, bias=bias)
    m = butterfly_matrix(layer.twiddles.detach().double().numpy())[:n_out, :n_in]
    x = torch.randn(7, n_in)
    want = x.double().numpy() @ m.T + (layer.bias.detach().double().numpy() if bias else 0.0)
    np.testing.assert_allclose(layer(x).detach().numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(layer.to_dense().numpy(), m, rtol=1e-5, atol=1e-6 * np.abs(m).max())


@pytest.mark.parametrize("n_in,n_out,bias", [(20, 13, True), (5, 8, False)])
def test_butterfly_gradients_pass_gradcheck(n_in, n_out, bias):
    """Oracle: finite differences (torch.autograd.gradcheck, float64) of the opaque custom op."""
    layer = ButterflyLinear(n_in, n_out, bias=bias).double()
    x = torch.randn(4, n_in, dtype=torch.float64, requires_grad=True)
    params = (x, layer.twiddles) + ((layer.bias,) if bias else ())
    fn = lambda x, tw, b=None: ops.butterfly(x, tw, b, n_out)  # noqa: E731
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_binary_linear_equals_linear_on_signs(bias):
    layer = BinaryLinear(100, 37, bias=bias)
    x = torch.randn(7, 100)
    x[0, :5] = 0.0  # sign(0) = +1
    scale = layer.weight.abs().mean(dim=1)
    want = F.linear(torch.where(x >= 0, 1.0, -1.0), torch.where(layer.weight >= 0, 1.0, -1.0)) * scale
    want = want + layer.bias if bias else want
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


CONVS = [  # (in, out, kernel, stride, padding, bias)
    (3, 4, 3, 1, 1, True), (3, 5, 3, (2, 1), (1, 0), False), (5, 6, 1, 1, 0, True), (2, 3, (1, 3), 2, (0, 2), False)]


@pytest.mark.parametrize("c_in,c_out,k,stride,pad,bias", CONVS)
def test_binary_conv_equals_conv2d_on_signs(c_in, c_out, k, stride, pad, bias):
    layer = BinaryConv2d(c_in, c_out, k, stride=stride, padding=pad, bias=bias)
    x = torch.randn(2, c_in, 7, 9)
    signs = lambda t: torch.where(t >= 0, 1.0, -1.0)  # noqa: E731
    want = F.conv2d(signs(x), signs(layer.weight), stride=stride, padding=pad)
    want = want * layer.weight.abs().mean(dim=(1, 2, 3)).reshape(1, -1, 1, 1)
    want = want + layer.bias.reshape(1, -1, 1, 1) if bias else want
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("make,shape", [(lambda: BinaryLinear(13, 9), (5, 13)),
                                        (lambda: BinaryConv2d(3, 4, 3, stride=(2, 1), padding=1), (2, 3, 6, 5))])
def test_frozen_is_bit_identical_and_packed(make, shape):
    layer = make()
    x = torch.randn(*shape)
    before, weight = layer(x), layer.weight.detach().clone()
    freeze(layer)
    assert layer.frozen and not hasattr(layer, "weight") and layer.weight_packed.dtype == torch.uint8
    assert torch.equal(layer.weight_packed, pack_bits(weight.flatten(1)))
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    k = weight[0].numel()
    assert layer.binary_weight_bytes() == weight.shape[0] * ((k + 7) // 8 + 4)


def test_sign_ste_forward_and_clipped_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    y = sign_ste(x)
    assert torch.equal(y, torch.tensor([-1.0, -1, -1, 1, 1, 1, 1]))
    y.backward(torch.arange(7.0))
    assert torch.equal(x.grad, torch.arange(7.0) * (x.detach().abs() <= 1))


def test_binary_linear_gradients_are_the_documented_ste():
    """Oracle: explicit loops over the formula of SignSTE's docstring (d sign(u)/du := 1{|u| <= 1})
    applied to y = alpha * sign(x) . sign(W)^T + b, with alpha = mean |W| differentiated exactly."""
    layer = BinaryLinear(6, 3).double()
    with torch.no_grad():
        layer.weight.mul_(3.0)  # some |W| > 1, so the clip matters on both sides
    x = (2 * torch.randn(5, 6, dtype=torch.float64)).requires_grad_()
    g = torch.randn(5, 3, dtype=torch.float64)
    layer(x).backward(g)
    X, W, G = x.detach().numpy(), layer.weight.detach().numpy(), g.numpy()
    sx, sw, alpha = np.where(X >= 0, 1.0, -1.0), np.where(W >= 0, 1.0, -1.0), np.abs(W).mean(1)
    dx, dw = np.zeros_like(X), np.zeros_like(W)
    for b in range(5):
        for n in range(3):
            s_bn = sum(sx[b, k] * sw[n, k] for k in range(6))
            for k in range(6):
                dx[b, k] += G[b, n] * alpha[n] * sw[n, k] * (abs(X[b, k]) <= 1)
                dw[n, k] += G[b, n] * (alpha[n] * sx[b, k] * (abs(W[n, k]) <= 1) + s_bn * sw[n, k] / 6)
    assert 0 < (np.abs(W) > 1).sum() and 0 < (np.abs(X) > 1).sum()
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad.numpy(), dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.bias.grad.numpy(), G.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pad_value", [0, 1])
def test_binary_conv_gradients_are_the_documented_ste(pad_value):
    """Oracle: autograd of a plain conv2d on u -> sign(u) + (m u - (m u).detach()), m = 1{|u| <= 1}:
    forward sign(u), gradient 1{|u| <= 1}, as SignSTE documents (no custom autograd.Function);
    padded with pad_value after the sign (a constant border: no gradient)."""
    layer = BinaryConv2d(2, 3, 3, stride=(2, 1), padding=1, pad_value=pad_value).double()
    with torch.no_grad():
        layer.weight.mul_(6.0)  # fan-in 18: the init bound is 0.24, so some |W| > 1 now
    x = (2 * torch.randn(2, 2, 5, 6, dtype=torch.float64)).requires_grad_()
    assert (layer.weight.abs() > 1).any() and (x.abs() > 1).any()
    g = torch.randn(2, 3, 3, 6, dtype=torch.float64)
    layer(x).backward(g)
    got = (x.grad, layer.weight.grad, layer.bias.grad)

    def ste(u):
        mu = u * (u.abs() <= 1)
        return torch.where(u >= 0, 1.0, -1.0).to(u.dtype) + mu - mu.detach()

    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, layer.weight, layer.bias))
    y = F.conv2d(F.pad(ste(x2), (1, 1, 1, 1), value=float(pad_value)), ste(w2), stride=(2, 1))
    y = y * w2.abs().mean((1, 2, 3)).reshape(1, -1, 1, 1)
    (y + b2.reshape(1, -1, 1, 1)).backward(g)
    for a, b in zip(got, (x2.grad, w2.grad, b2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c_in,c_out,k,stride,pad,bias", CONVS + [(65, 3, (2, 3), (2, 1), (1, 2), True)])
def test_binary_conv_one_padding_equals_conv2d_on_signs_padded_with_ones(c_in, c_out, k, stride, pad, bias):
    """pad_value=1: training forward = torch oracle (sign(x) padded with +1) = frozen custom op, exactly;
    STE gradients reach x and W, finite and non-zero; pad_value=0 is the zero-padded layer."""
    torch.manual_seed(c_in + c_out)
    layer = BinaryConv2d(c_in, c_out, k, stride=stride, padding=pad, bias=bias, pad_value=1)
    x = torch.randn(2, c_in, 7, 9, requires_grad=True)
    (ph, pw), signs = layer.padding, lambda t: torch.where(t >= 0, 1.0, -1.0)  # noqa: E731
    want = F.conv2d(F.pad(signs(x.detach()), (pw, pw, ph, ph), value=1.0), signs(layer.weight.detach()), stride=stride)
    want = want * layer.weight.detach().abs().mean(dim=(1, 2, 3)).reshape(1, -1, 1, 1)
    want = want + layer.bias.detach().reshape(1, -1, 1, 1) if bias else want
    y = layer(x)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.square().sum().backward()
    for g in (x.grad, layer.weight.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    zero = BinaryConv2d(c_in, c_out, k, stride=stride, padding=pad, bias=bias, pad_value=0)
    zero.load_state_dict(layer.state_dict())
    with torch.no_grad():
        s = F.conv2d(signs(x), signs(layer.weight), stride=stride, padding=pad)  # zero padding
        s = s * layer.weight.abs().mean(dim=(1, 2, 3)).reshape(1, -1, 1, 1)
        torch.testing.assert_close(zero(x), s + layer.bias.reshape(1, -1, 1, 1) if bias else s, rtol=0, atol=0)
        assert torch.equal(zero(x), y) == (layer.padding == (0, 0))
        freeze(layer)
        assert "pad_value=1" in repr(layer)
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)  # the frugalrt::binary_conv op


def test_binary_conv_refuses_other_pad_values():
    with pytest.raises(ValueError, match="BinaryConv2d: pad_value must be 0 or 1, got 2"):
        BinaryConv2d(3, 4, 3, padding=1, pad_value=2)


@pytest.mark.parametrize("k", [1, 7, 8, 13, 64, 100])
def test_pack_unpack_round_trip(k):
    values = torch.randn(3, k)
    values[0, 0] = 0.0
    packed = pack_bits(values)
    assert packed.shape == (3, (k + 7) // 8) and packed.dtype == torch.uint8
    torch.testing.assert_close(unpack_signs(packed, k), sign(values), rtol=0, atol=0)
