"""Each frugal layer against an exact oracle (larq style): float twins on sign()'d tensors."""
import pytest
import torch
import torch.nn.functional as F

from frugalrt.nn import BinaryConv2d, BinaryLinear, ButterflyLinear, freeze, sign_ste
from frugalrt.nn.ops import butterfly_dense_path, pack_bits, sign, unpack_signs


@pytest.mark.parametrize("n_in,n_out,bias", [(16, 16, True), (20, 13, False), (100, 37, True), (5, 64, True)])
def test_butterfly_equals_its_dense_matrix(n_in, n_out, bias):
    layer = ButterflyLinear(n_in, n_out, bias=bias)
    x = torch.randn(7, n_in)
    want = x @ layer.to_dense().T + (layer.bias if bias else 0)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_butterfly_gradient_matches_autograd_of_the_dense_path():
    layer = ButterflyLinear(20, 13)
    x = torch.randn(4, 20, requires_grad=True)
    layer(x).square().sum().backward()
    got = [x.grad, layer.twiddles.grad, layer.bias.grad]
    x2, tw, b = (t.detach().clone().requires_grad_() for t in (x, layer.twiddles, layer.bias))
    butterfly_dense_path(x2, tw, b, 13).square().sum().backward()
    for g, w in zip(got, [x2.grad, tw.grad, b.grad]):
        torch.testing.assert_close(g, w)


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


def test_binary_layer_trains_through_ste():
    layer = BinaryLinear(16, 4)
    x = torch.randn(8, 16)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 7, 8, 13, 64, 100])
def test_pack_unpack_round_trip(k):
    values = torch.randn(3, k)
    values[0, 0] = 0.0
    packed = pack_bits(values)
    assert packed.shape == (3, (k + 7) // 8) and packed.dtype == torch.uint8
    torch.testing.assert_close(unpack_signs(packed, k), sign(values), rtol=0, atol=0)
