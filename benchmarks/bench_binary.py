"""Binary (XNOR-popcount) GEMM and 3x3 convolutions: frugalrt vs float32 torch and ONNX Runtime.

frugalrt: a one-node model (BinaryGemm, BinaryConv) compiled by ``frugalrt.compile`` for ``host``
and timed through the Relax VM, i.e. what a user's artifact runs; next to it the kernel the
lowering picks for this CPU (``cpu_binary_vpopcnt`` / ``cpu_binary_conv`` with AVX-512 VPOPCNTDQ,
the AVX2 table and byte-count kernels otherwise), compiled alone and called directly on
preallocated tensors, so the VM's share shows. Binary MAC/s = M*K*N (or OH*OW*O*C*9) / time; one
line per case on stderr puts both rates next to the ratio to torch fp32 (one thread).
"""
from __future__ import annotations

import sys

import numpy as np

from benchmarks.common import (case, compile_host_vm, dense_matmul_onnx, host_target, ort_runner, ort_session,
                               side_by_side, timer, tvm_timer)

GEMMS = ((1, 4096, 4096), (64, 1024, 1024))
CONVS = ((64, 56, 56, 64), (128, 28, 28, 128), (256, 14, 14, 256))  # C, H, W, O; 3x3, pad 1


def direct_kernel(func, x, consts, out_shape):
    """``func`` compiled for this CPU alone, with its preallocated tensors: (module, args)."""
    import tvm

    lib = tvm.compile(func, target=host_target())
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in (x, *consts, np.zeros(out_shape, np.float32))]
    lib(*args)
    return lib.mod, args


def gemm_kernel(x, w_packed, scale, bias):
    """The BinaryGemm kernel the x86 lowering picks here (VPOPCNTDQ, else AVX2 tables), called directly."""
    from frugalrt.targets.kernels import cpu_binary, cpu_binary_vpopcnt

    k = x.shape[1]
    pick = cpu_binary_vpopcnt if cpu_binary_vpopcnt.has_vpopcntdq(host_target()) else cpu_binary
    func, consts = pick.kernel_inputs(w_packed, scale, bias, k)
    return direct_kernel(func, x, consts, (x.shape[0], w_packed.shape[0]))


def conv_kernel(x, w_packed, scale, out_shape):
    """The BinaryConv kernel the x86 lowering picks here (16 u32 lanes with VPOPCNTDQ, else 4 u64), called directly."""
    from frugalrt.targets.kernels import cpu_binary_conv as cv
    from frugalrt.targets.kernels.cpu_binary import padded_scale_bias

    c, h, w = x.shape[1:]
    lanes = cv.WIDE if cv.has_vpopcntdq(host_target()) else cv.LANES
    words, row_ids, offset = cv.repack(w_packed, c, 3, 3, h, w, [1, 1], [1, 1, 1, 1], lanes)
    scale_p, bias_p = padded_scale_bias(scale, None, words.shape[-1])
    func = cv.binary_conv_primfunc(c, h, w, w_packed.shape[0], 3, 3, [1, 1], [1, 1, 1, 1], offset.shape[0], lanes)
    return direct_kernel(func, x, [words, row_ids, offset, scale_p, bias_p], out_shape)


def conv_fp32_onnx(weight, h: int, w: int):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1])], "conv",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", weight.shape[1], h, w])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def report(name: str, macs: int, times: dict[str, float], baseline: str) -> dict:
    """The binary MAC/s of the VM and of the direct kernel, and the ratio to ``baseline``, on one stderr line."""
    rates = {"binary_gmacs": macs / times["frugalrt"] / 1e3, "binary_gmacs_direct": macs / times["kernel direct"] / 1e3}
    print(f"binary {name}: {rates['binary_gmacs']:.0f} G binary MAC/s through the VM, "
          f"{rates['binary_gmacs_direct']:.0f} G direct; x{times[baseline] / times['frugalrt']:.1f} "
          f"(VM) / x{times[baseline] / times['kernel direct']:.1f} (direct) vs {baseline}", file=sys.stderr)
    return rates


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
        mod, kernel_args = gemm_kernel(x, wp, scale, bias)
        exact = bool(np.array_equal(vm["main"](xt_tvm).numpy(), expected)
                     and np.array_equal(kernel_args[-1].numpy(), expected))
        xt, wt = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(w.T))
        times = side_by_side({
            "frugalrt": tvm_timer(vm, "main", [xt_tvm]),
            "kernel direct": tvm_timer(mod, "main", kernel_args),
            "torch fp32 matmul": timer(lambda: xt @ wt),
            "ORT fp32 MatMul": timer(ort_runner(ort_session(dense_matmul_onnx(w.T)), x))}, repeat)
        name = f"GEMM {m}x{k}x{n}"
        rows.append(case("binary", name, times,
                         {"exact": exact, **report(name, m * k * n, times, "torch fp32 matmul")}))
        print(f"binary {name}: done (exact: {exact})", file=sys.stderr)
    for c, h, wd, o in CONVS[:1] if args.quick else CONVS:
        x = rng.standard_normal((1, c, h, wd)).astype(np.float32)
        w = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
        wp, scale = pack_bits(w.reshape(o, -1)), np.abs(w).mean((1, 2, 3)).astype(np.float32)
        vm, _ = compile_host_vm(single_op_model("BinaryConv", [c, h, wd], {"W_packed": wp, "scale": scale},
                                                {"in_channels": c, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}))
        xt_tvm = tvm.runtime.tensor(x, tvm.cpu())
        expected = binary_conv(x, wp, scale, in_channels=c, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        mod, kernel_args = conv_kernel(x, wp, scale, expected.shape)
        exact = bool(np.array_equal(vm["main"](xt_tvm).numpy(), expected)
                     and np.array_equal(kernel_args[-1].numpy(), expected))
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        times = side_by_side({
            "frugalrt": tvm_timer(vm, "main", [xt_tvm]),
            "kernel direct": tvm_timer(mod, "main", kernel_args),
            "torch fp32 conv2d": timer(lambda: torch.nn.functional.conv2d(xt, wt, padding=1)),
            "ORT fp32 Conv": timer(ort_runner(ort_session(conv_fp32_onnx(w, h, wd)), x))}, repeat)
        name = f"conv3x3 {h}x{wd}x{c}->{o}"
        rows.append(case("binary", name, times,
                         {"exact": exact, **report(name, h * wd * o * c * 9, times, "torch fp32 conv2d")}))
        print(f"binary {name}: done (exact: {exact})", file=sys.stderr)
    return rows
