"""Binary (XNOR-popcount) GEMM and 3x3 convolution: frugalrt vs float32 torch and ONNX Runtime.

frugalrt: a one-node model (BinaryGemm, BinaryConv) compiled by ``frugalrt.compile`` for ``host``
and timed through the Relax VM, i.e. what a user's artifact runs (``cpu_binary``: AVX2 table
lookups; ``cpu_binary_conv``). Next to the GEMM, the plain XOR + popcount kernel it beat, called
directly on preallocated tensors.
Binary MAC/s = M*K*N (or OH*OW*O*C*9) / time.
"""
from __future__ import annotations

import sys

import numpy as np

from benchmarks.common import (case, compile_host_vm, dense_matmul_onnx, host_target, ort_runner, ort_session,
                               side_by_side, timer, tvm_timer)

GEMMS = ((1, 4096, 4096), (64, 1024, 1024))
CONV = (64, 56, 56, 64)  # C, H, W, O; 3x3, pad 1


def xor_popcount_kernel(x, w_packed, scale, bias):
    """For comparison: XOR + LLVM's AVX2 popcount (the VPOPCNTDQ kernel's TIR at 4 lanes), compiled
    directly; returns (module, preallocated args)."""
    import tvm

    from frugalrt.targets.kernels import cpu_binary, cpu_binary_vpopcnt as vp

    k, n = x.shape[1], w_packed.shape[0]
    n_pad = -(-n // (4 * vp.VECS)) * 4 * vp.VECS
    lib = tvm.compile(vp.vpopcnt_gemm_primfunc(k, n, n_pad, 4), target=host_target())
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in (x, vp.repack_words(w_packed, n_pad, 4),
                                                       *cpu_binary.padded_scale_bias(scale, bias, n_pad),
                                                       np.zeros((x.shape[0], n), np.float32))]
    lib(*args)
    return lib.mod, args


def conv_fp32_onnx(weight):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1])], "conv",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", *weight.shape[1:2], 56, 56])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(args) -> list[dict]:
    import torch
    import tvm

    from frugalrt.export.single_op import single_op_model
    from frugalrt.runtime.reference import binary_conv, binary_gemm, pack_bits

    repeat, rng, rows = (5 if args.quick else 30), np.random.default_rng(0), []
    for m, k, n in GEMMS[1:] if args.quick else GEMMS:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        wp, scale, bias = pack_bits(w), np.abs(w).mean(1).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        expected = binary_gemm(x, wp, scale, bias, in_features=k)
        vm, _ = compile_host_vm(single_op_model("BinaryGemm", [k], {"W_packed": wp, "scale": scale, "B": bias},
                                                {"in_features": k}))
        xt_tvm = tvm.runtime.tensor(x, tvm.cpu())
        xor_mod, xor_args = xor_popcount_kernel(x, wp, scale, bias)
        exact = bool(np.array_equal(vm["main"](xt_tvm).numpy(), expected)
                     and np.array_equal(xor_args[-1].numpy(), expected))
        xt, wt = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(w.T))
        times = side_by_side({
            "frugalrt": tvm_timer(vm, "main", [xt_tvm]),
            "frugalrt XOR+popcount (AVX2)": tvm_timer(xor_mod, "main", xor_args),
            "torch fp32 matmul": timer(lambda: xt @ wt),
            "ORT fp32 MatMul": timer(ort_runner(ort_session(dense_matmul_onnx(w.T)), x))}, repeat)
        rows.append(case("binary", f"GEMM {m}x{k}x{n}", times,
                         {"exact": exact, "binary_gmacs": m * k * n / times["frugalrt"] / 1e3}))
        print(f"binary GEMM {m}x{k}x{n}: done (exact: {exact})", file=sys.stderr)
    c, h, wd, o = CONV
    x = rng.standard_normal((1, c, h, wd)).astype(np.float32)
    w = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    wp, scale = pack_bits(w.reshape(o, -1)), np.abs(w).mean((1, 2, 3)).astype(np.float32)
    vm, _ = compile_host_vm(single_op_model("BinaryConv", [c, h, wd], {"W_packed": wp, "scale": scale},
                                            {"in_channels": c, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}))
    xt_tvm = tvm.runtime.tensor(x, tvm.cpu())
    exact = bool(np.array_equal(vm["main"](xt_tvm).numpy(),
                                binary_conv(x, wp, scale, in_channels=c, kernel_shape=[3, 3], pads=[1, 1, 1, 1])))
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    times = side_by_side({
        "frugalrt": tvm_timer(vm, "main", [xt_tvm]),
        "torch fp32 conv2d": timer(lambda: torch.nn.functional.conv2d(xt, wt, padding=1)),
        "ORT fp32 Conv": timer(ort_runner(ort_session(conv_fp32_onnx(w)), x))}, repeat)
    rows.append(case("binary", f"conv3x3 {h}x{wd}x{c}->{o}", times,
                     {"exact": exact, "binary_gmacs": h * wd * o * c * 9 / times["frugalrt"] / 1e3}))
    print(f"binary conv: done (exact: {exact})", file=sys.stderr)
    return rows
