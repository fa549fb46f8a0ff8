"""Packed activations in the TVM lowerings (docs/ops.md, "Packed activations"): the compile-time sign
thresholds, the generic kernels compiled for this machine, the per-target gate, and a C bundle built
natively with gcc, each bit for bit against the numpy reference kernels (through ONNX Runtime)."""
import json

import numpy as np
import onnx
import pytest
import torch

import frugalrt
from frugalrt.export.fold import optimize_graph, pack_between_binary
from frugalrt.export.single_op import chain_model
from frugalrt.runtime import reference as ref
from frugalrt.runtime.ort import run
from frugalrt.targets.kernels.binary import packs_activations, sign_thresholds
from frugalrt.targets.registry import tvm_target

RNG = np.random.default_rng(11)
CLIP = {"activation": "clip", "activation_min": -0.3, "activation_max": 0.7}


@pytest.mark.parametrize("activation", [{}, {"activation": "relu"}, CLIP,
                                        {"activation": "clip", "activation_min": 0.0, "activation_max": 1.0}])
def test_sign_thresholds_equal_the_float_result_for_every_sum(activation):
    """Every S in [-K, K], channels with positive, negative, zero, -0.0, tiny and huge scales, and
    biases that make Y exactly 0 (or overflow to +-inf) at some S."""
    k = 37
    scale = np.concatenate([RNG.standard_normal(40), [0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, 0.5, -0.25]])
    bias = np.concatenate([RNG.standard_normal(40) * 5, [1.0, -1.0, 0.0, -0.0, 3e38, -3e38, -0.5, 0.75]])
    scale, bias = scale.astype(np.float32), bias.astype(np.float32)
    sense, t = sign_thresholds(scale, bias, k, activation)
    s = np.arange(-k, k + 1, dtype=np.int32)[:, None]
    with np.errstate(over="ignore"):
        y = ref.activate((s.astype(np.float32) * scale + bias).astype(np.float32), **activation)
    np.testing.assert_array_equal(sense * s < t, y < 0)


def test_every_cpu_target_packs_cuda_does_not():
    packing = {name: packs_activations(tvm_target(name))
               for name in ("cortex-m4", "rpi-zero", "x86-64-v1", "x86-64-v3", "rpi4", "armv7", "cuda")}
    assert packing == {"cortex-m4": True, "rpi-zero": True, "x86-64-v1": True, "x86-64-v3": True,
                       "rpi4": True, "armv7": True, "cuda": False}


def _consts(rows: int, k: int) -> dict:
    """Packed weights, a scale with negative and zero entries, a bias hitting Y == 0 (0.5 * 1 - 0.5)."""
    scale, bias = RNG.standard_normal(rows).astype(np.float32), RNG.standard_normal(rows).astype(np.float32)
    scale[0], scale[1], bias[1] = 0.0, 0.5, -0.5
    return {"W_packed": ref.pack_bits(RNG.standard_normal((rows, k))), "scale": scale, "B": bias}


CHAINS = {  # name -> (model, X shape without batch); K, C, N: no multiples of 8, 32 or 64
    "gemm": (chain_model("BinaryGemm", [77], [({"in_features": 77, **CLIP}, _consts(45, 77)),
                                         ({"in_features": 45}, _consts(13, 45)),
                                         ({"in_features": 13, "activation": "relu"}, _consts(9, 13))]), (77,)),
    "conv": (chain_model("BinaryConv", [3, 9, 8], [
        (dict(in_channels=3, kernel_shape=[3, 3], pads=[1, 1, 1, 1], **CLIP), _consts(11, 27)),
        (dict(in_channels=11, kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 2, 1], pad_value=1), _consts(37, 66)),
        (dict(in_channels=37, kernel_shape=[2, 2], activation="relu"), _consts(5, 148))]), (3, 9, 8)),
}


@pytest.mark.compile
def test_importer_packs_only_where_the_gate_allows():
    """The same graph, float or already packed (as ``frugalrt.export`` writes it): packed kernels for the
    C bundle, float activations between CUDA's kernels."""
    from frugalrt.targets.importer import import_onnx

    model, _ = CHAINS["gemm"]
    packed = onnx.ModelProto()
    packed.CopyFrom(model)
    assert pack_between_binary(packed) == 2
    for graph in (model, packed):
        kernels = {name: [gv.name_hint for gv in import_onnx(graph, tvm_target(name)).functions
                          if "binary" in gv.name_hint] for name in ("cortex-m4", "cuda")}
        assert sum("packed" in k for k in kernels["cortex-m4"]) == 3
        assert kernels["cuda"] and not any("packed" in k for k in kernels["cuda"])


@pytest.mark.compile
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_generic_kernels_on_this_machine_equal_the_reference(chain):
    """The packed graph compiled for x86-64 (packed nodes always get the generic kernels; the last
    layer reads packed bits and writes float32) vs the unpacked graph in the reference kernels."""
    import tvm
    from tvm import relax

    from frugalrt.targets.importer import import_onnx

    model, x_dims = CHAINS[chain]
    packed = onnx.ModelProto()
    packed.CopyFrom(model)
    assert pack_between_binary(packed) == 2
    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    mod = import_onnx(packed, target)
    assert sum("packed" in gv.name_hint for gv in mod.functions) == 3
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    for batch in (1, 3):
        x = RNG.standard_normal((batch, *x_dims)).astype(np.float32)
        x.flat[::5] = 0.0  # sign(0) = +1
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), run(model, [x])[0])


@pytest.mark.compile
def test_c_bundle_with_packed_activations_is_bit_identical_to_the_reference(tmp_path, run_bundle_natively,
                                                                           binary_net):
    """Two binary convs, then two binary linears (BatchNorms with negative gammas, Hardtanh), compiled
    for Cortex-M: the compiler packs conv -> conv and linear -> linear; built natively with gcc."""
    net = binary_net(3, 13, 7, 4 * 3, 19, seed=2)
    x = torch.randn(4, 3, 9, 7)
    model = frugalrt.export(net, (x,), tmp_path / "m.onnx", fold_bn=False)
    bundle = frugalrt.compile(tmp_path / "m.onnx", "cortex-m4", tmp_path / "m4").lib_path
    plan = json.loads((bundle / "plan.json").read_text())
    assert sum("packed" in step["kernel"] for step in plan["steps"]) == 4
    got = run_bundle_natively(bundle, x.numpy())
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    optimize_graph(folded)  # unpacked: the reference as it runs without the new attributes
    np.testing.assert_array_equal(got, run(folded, [x.numpy()])[0])


@pytest.mark.compile
def test_c_bundle_conv_chain_with_one_padding_equals_the_reference(tmp_path, run_bundle_natively):
    """The conv chain (its middle layer one-padded, ``pad_value = 1``) as a Cortex-M bundle, packed
    between layers, built natively: equal to the reference on the unpacked graph."""
    model, x_dims = CHAINS["conv"]
    onnx.save(model, tmp_path / "chain.onnx")
    bundle = frugalrt.compile(tmp_path / "chain.onnx", "cortex-m4", tmp_path / "m4").lib_path
    x = RNG.standard_normal((3, *x_dims)).astype(np.float32)
    x.flat[::7] = 0.0
    np.testing.assert_array_equal(run_bundle_natively(bundle, x), run(model, [x])[0].reshape(3, -1))
