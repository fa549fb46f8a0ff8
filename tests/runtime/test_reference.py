"""The numpy reference kernels against PyTorch oracles (independent implementations of docs/ops.md)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from frugalrt.nn.ops import butterfly_dense_path
from frugalrt.runtime.reference import get_reference, pack_bits, unpack_signs


def _signs(a):
    return np.where(a >= 0, 1.0, -1.0).astype(np.float32)


def _explicit_butterfly(x, tw, out):
    """Direct transcription of the ops.md loop: pair p of stage s joins i = (p // h) * 2h + p % h, i + h."""
    stages, half = tw.shape[:2]
    y = np.zeros((x.shape[0], 2 * half), np.float64)
    y[:, : x.shape[1]] = x
    for s in range(stages):
        h, z = 1 << s, y.copy()
        for p in range(half):
            i = (p // h) * 2 * h + p % h
            j = i + h
            z[:, i] = tw[s, p, 0, 0] * y[:, i] + tw[s, p, 0, 1] * y[:, j]
            z[:, j] = tw[s, p, 1, 0] * y[:, i] + tw[s, p, 1, 1] * y[:, j]
        y = z
    return y[:, :out]


@pytest.mark.parametrize("n_in,n_out,n", [(16, 16, 16), (20, 13, 32), (5, 8, 8), (2, 1, 2)])
def test_butterfly_reference(n_in, n_out, n):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, n_in)).astype(np.float32)
    tw = rng.standard_normal((n.bit_length() - 1, n // 2, 2, 2)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    got = get_reference("Butterfly")(x, tw, b, out_features=n_out)
    # oracle 1: the literal loop of the spec, in float64
    np.testing.assert_allclose(got, _explicit_butterfly(x, tw, n_out) + b, rtol=1e-5, atol=1e-5)
    # oracle 2: the torch op's eager path is the same formula, hence bit-identical
    want = butterfly_dense_path(torch.from_numpy(x), torch.from_numpy(tw), torch.from_numpy(b), n_out)
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("k,n,bias", [(13, 9, True), (64, 5, False), (100, 37, True), (1, 3, False)])
def test_binary_gemm_reference(k, n, bias):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, k)).astype(np.float32)
    x[0, 0] = 0.0
    w = rng.standard_normal((n, k)).astype(np.float32)
    scale = np.abs(w).mean(1).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    got = get_reference("BinaryGemm")(x, pack_bits(w), scale, b, in_features=k)
    want = F.linear(torch.from_numpy(_signs(x)), torch.from_numpy(_signs(w))) * torch.from_numpy(scale)
    want = want + torch.from_numpy(b) if bias else want
    np.testing.assert_array_equal(got, want.numpy())
    # popcount form of the spec: K - 2 * popcount(xbits XOR wbits)
    xor = np.bitwise_xor(pack_bits(x)[:, None, :], pack_bits(w)[None, :, :])
    counts = k - 2 * np.bitwise_count(xor).astype(np.int64).sum(-1)
    np.testing.assert_array_equal(got, (counts.astype(np.float32) * scale + (b if bias else 0)).astype(np.float32))


@pytest.mark.parametrize("c,o,kernel,strides,pads,bias", [
    (3, 4, (3, 3), (1, 1), (1, 1, 1, 1), True), (3, 5, (3, 3), (2, 1), (1, 0, 1, 0), False),
    (5, 6, (1, 1), (1, 1), (0, 0, 0, 0), True), (2, 3, (1, 3), (2, 2), (0, 2, 0, 2), False),
    (2, 3, (3, 2), (1, 2), (2, 0, 1, 1), True)])  # unequal begin/end pads
def test_binary_conv_reference(c, o, kernel, strides, pads, bias):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, c, 7, 9)).astype(np.float32)
    w = rng.standard_normal((o, c, *kernel)).astype(np.float32)
    scale = np.abs(w).mean((1, 2, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32) if bias else None
    got = get_reference("BinaryConv")(x, pack_bits(w.reshape(o, -1)), scale, b, in_channels=c,
                                      kernel_shape=kernel, strides=strides, pads=pads)
    xs = F.pad(torch.from_numpy(_signs(x)), (pads[1], pads[3], pads[0], pads[2]))  # pad after sign: 0
    want = F.conv2d(xs, torch.from_numpy(_signs(w)), stride=strides) * torch.from_numpy(scale).reshape(1, -1, 1, 1)
    want = want + torch.from_numpy(b).reshape(1, -1, 1, 1) if bias else want
    np.testing.assert_array_equal(got, want.numpy())


def test_bit_layout_is_lsb_first_with_set_bit_negative():
    packed = pack_bits(np.array([[-1, 1, 1, 1, 1, 1, 1, 1, 1, -1]], np.float32))
    np.testing.assert_array_equal(packed, [[0b00000001, 0b00000010]])
    np.testing.assert_array_equal(unpack_signs(packed, 10), [[-1, 1, 1, 1, 1, 1, 1, 1, 1, -1]])


def test_unknown_kernel_names_the_op():
    with pytest.raises(KeyError, match="ai.frugalrt::Nope"):
        get_reference("Nope")


# (c, o, kernel, strides, pads, bias): odd channel counts, unequal begin/end pads
ONE_PADDED = [(3, 4, (3, 3), (1, 1), (1, 1, 1, 1), True), (3, 5, (3, 2), (2, 1), (2, 0, 1, 1), False),
              (65, 6, (3, 3), (2, 2), (1, 2, 0, 1), True), (65, 3, (2, 3), (1, 2), (0, 1, 2, 0), False)]


@pytest.mark.parametrize("c,o,kernel,strides,pads,bias", ONE_PADDED)
def test_binary_conv_reference_one_padding(c, o, kernel, strides, pads, bias):
    """pad_value = 1: padded taps read +1. Oracles: torch conv2d on sign(x) padded with ones, and the
    popcount form of docs/ops.md, S = C*kh*kw - 2 * popcount(xbits XOR wbits) with padded bits 0."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, c, 7, 9)).astype(np.float32)
    x[0, 0, :2] = 0.0  # sign(0) = +1
    w = rng.standard_normal((o, c, *kernel)).astype(np.float32)
    scale = np.abs(w).mean((1, 2, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32) if bias else None
    got = get_reference("BinaryConv")(x, pack_bits(w.reshape(o, -1)), scale, b, in_channels=c,
                                      kernel_shape=kernel, strides=strides, pads=pads, pad_value=1)
    xs = F.pad(torch.from_numpy(_signs(x)), (pads[1], pads[3], pads[0], pads[2]), value=1.0)
    s = F.conv2d(xs, torch.from_numpy(_signs(w)), stride=strides)
    want = s * torch.from_numpy(scale).reshape(1, -1, 1, 1)
    want = want + torch.from_numpy(b).reshape(1, -1, 1, 1) if bias else want
    np.testing.assert_array_equal(got, want.numpy())
    cols = F.unfold(xs, kernel, stride=strides).transpose(1, 2).numpy()  # [batch, OH*OW, C*kh*kw], (c, i, j)
    xor = np.bitwise_xor(pack_bits(cols)[:, :, None, :], pack_bits(w.reshape(o, -1))[None, None])
    counts = c * kernel[0] * kernel[1] - 2 * np.bitwise_count(xor).astype(np.int64).sum(-1)  # [batch, OH*OW, O]
    np.testing.assert_array_equal(counts.transpose(0, 2, 1).reshape(s.shape), s.numpy())
    zero = get_reference("BinaryConv")(x, pack_bits(w.reshape(o, -1)), scale, b, in_channels=c,
                                       kernel_shape=kernel, strides=strides, pads=pads)
    assert not np.array_equal(got, zero)  # the border differs from zero padding


@pytest.mark.parametrize("packed_in,packed_out", [(0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("c,o,kernel,strides,pads,bias", ONE_PADDED[1:3])
def test_binary_conv_one_padding_packed_equals_unpacked(c, o, kernel, strides, pads, bias, packed_in, packed_out):
    """Packed X and Y leave one-padding as it is: it applies to the unpacked signs."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, c, 7, 9)).astype(np.float32)
    w = rng.standard_normal((o, c, *kernel)).astype(np.float32)
    scale, b = rng.standard_normal(o).astype(np.float32), rng.standard_normal(o).astype(np.float32)
    conv = get_reference("BinaryConv")
    kw = dict(in_channels=c, kernel_shape=kernel, strides=strides, pads=pads, pad_value=1,
              activation="clip", activation_min=-0.5, activation_max=2.0)
    want = conv(x, pack_bits(w.reshape(o, -1)), scale, b if bias else None, **kw)
    xin = pack_bits(x.transpose(0, 2, 3, 1)) if packed_in else x
    got = conv(xin, pack_bits(w.reshape(o, -1)), scale, b if bias else None, input_packed=packed_in,
               output_packed=packed_out, **kw)
    np.testing.assert_array_equal(got, pack_bits(want.transpose(0, 2, 3, 1)) if packed_out else want)


@pytest.mark.parametrize("bad", [2, -1])
def test_binary_conv_reference_refuses_other_pad_values(bad):
    with pytest.raises(ValueError, match=rf"BinaryConv: pad_value must be 0 or 1, got {bad}"):
        get_reference("BinaryConv")(np.zeros((1, 1, 3, 3), np.float32), np.zeros((1, 2), np.uint8),
                                    np.ones(1, np.float32), in_channels=1, kernel_shape=(3, 3), pads=(1, 1, 1, 1),
                                    pad_value=bad)
