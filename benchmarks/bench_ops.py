"""Standard ops one by one: frugalrt (``host`` artifact) vs ONNX Runtime, single thread, side by side.

Each case is a one-node ONNX model (constant weights as initializers, the leading dimension
dynamic) compiled by ``frugalrt.compile`` for ``host``, i.e. run through the kernels of
``frugalrt.targets.kernels.standard`` (dense panels, batched matmul, convolution, softmax, LayerNorm,
GELU), and
the same model in ONNX Runtime (CPU provider, one thread). "x frugalrt" = ORT time / frugalrt time
(> 1: frugalrt faster); the target is >= 0.67 (frugalrt within 1.5x of ORT). Each row also records
the largest difference from ORT's output (``max_abs_vs_ort``) and ``within_1_5x``.

On the emulated rpi4 (qemu-aarch64 Cortex-A72), the single-input cases compiled for ``rpi4`` and
the same models in ONNX Runtime 1.19.2 for aarch64: instructions per whole inference from the
device's Python (``benchmarks.bench_models.EmulatedCounter``: slope over N runs, deterministic),
ratio = ORT / frugalrt, same >= 0.67 target.
"""
from __future__ import annotations

import sys

import numpy as np

from benchmarks.common import case, compile_host_vm, ort_session, side_by_side, timer, tvm_timer

TARGET_RATIO = 1 / 1.5


def _model(nodes, inputs: dict, inits: dict, opset: int = 20):
    """ONNX model of ``nodes``: ``inputs`` name -> shape (first dim may be a name), ``inits`` name -> array."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info(k, TensorProto.FLOAT, s)
                                            for k, s in inputs.items()],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)  # ORT 1.19 reads <= 10


def cases(quick: bool, rng) -> list[tuple[str, object, dict]]:
    """(name, ONNX model, feeds) of each case."""
    from onnx import helper

    def f32(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = []
    gemms = [(1, 1024, 1024), (32, 1024, 1024), (32, 1024, 10)] if not quick else [(32, 1024, 10)]
    for m, k, n in gemms:  # nn.Linear as Gemm: W [N, K] (transB), bias C
        model = _model([helper.make_node("Gemm", ["X", "W", "C"], ["Y"], transB=1)], {"X": ["batch", k]},
                       {"W": f32(n, k, scale=k ** -0.5), "C": f32(n)})
        out.append((f"Gemm {m}x{k}x{n} (transB, bias)", model, {"X": f32(m, k)}))
    if not quick:
        model = _model([helper.make_node("MatMul", ["X", "W"], ["Y"])], {"X": ["batch", 256]},
                       {"W": f32(256, 256, scale=1 / 16)})
        out.append(("MatMul 64x256x256", model, {"X": f32(64, 256)}))
    model = _model([helper.make_node("MatMul", ["A", "B"], ["Y"])], {"A": ["batch", 64, 64], "B": ["batch", 64, 64]},
                   {})
    out.append(("batched MatMul 4x(64x64)@(64x64)", model, {"A": f32(4, 64, 64), "B": f32(4, 64, 64)}))
    if not quick:
        model = _model([helper.make_node("Transpose", ["B"], ["Bt"], perm=[0, 2, 1]),
                        helper.make_node("MatMul", ["A", "Bt"], ["Y"])],
                       {"A": ["batch", 64, 64], "B": ["batch", 64, 64]}, {})
        out.append(("attention scores 4x(64x64)@(64x64)^T", model, {"A": f32(4, 64, 64), "B": f32(4, 64, 64)}))
    convs = [(3, 32, 32, 1), (32, 64, 16, 1)] if not quick else [(3, 32, 32, 1)]
    for c, o, hw, stride in convs:  # 3x3, pad 1, bias: a 3-channel stem and a body convolution
        model = _model([helper.make_node("Conv", ["X", "W", "B"], ["Y"], pads=[1, 1, 1, 1], strides=[stride] * 2)],
                       {"X": ["batch", c, hw, hw]}, {"W": f32(o, c, 3, 3, scale=(9 * c) ** -0.5), "B": f32(o)})
        out.append((f"Conv {c}->{o} 3x3 {hw}x{hw}", model, {"X": f32(1, c, hw, hw)}))
    model = _model([helper.make_node("Softmax", ["X"], ["Y"], axis=-1)], {"X": ["batch", 64, 64]}, {})
    out.append(("Softmax 4x64x64", model, {"X": f32(4, 64, 64, scale=3.0)}))
    model = _model([helper.make_node("LayerNormalization", ["X", "G", "B"], ["Y"], axis=-1, epsilon=1e-5)],
                   {"X": ["batch", 256]}, {"G": f32(256), "B": f32(256)})
    out.append(("LayerNorm 64x256", model, {"X": f32(64, 256)}))
    model = _model([helper.make_node("Gelu", ["X"], ["Y"])], {"X": ["batch", 1024]}, {})
    out.append(("GELU 64x1024", model, {"X": f32(64, 1024, scale=2.0)}))
    return out


def run(args) -> list[dict]:
    import tvm

    repeat, rng, rows = (5 if args.quick else 30), np.random.default_rng(0), []
    for name, model, feeds in cases(args.quick, rng):
        session = ort_session(model)
        expected = session.run(None, feeds)[0]
        vm, _ = compile_host_vm(model)
        tensors = [tvm.runtime.tensor(v, tvm.cpu()) for v in feeds.values()]
        err = float(np.abs(vm["main"](*tensors).numpy() - expected).max())
        times = side_by_side({"frugalrt": tvm_timer(vm, "main", tensors),
                              "ONNX Runtime": timer(lambda: session.run(None, feeds))}, repeat)
        ratio = times["ONNX Runtime"] / times["frugalrt"]
        rows.append(case("ops", name, times, {"max_abs_vs_ort": err, "within_1_5x": ratio >= TARGET_RATIO}))
        print(f"ops {name}: x{ratio:.2f} vs ORT (max abs diff {err:.1e})", file=sys.stderr)
    return rows + emulated_rows(args.quick)


def emulated_rows(quick: bool) -> list[dict]:
    """Instructions per whole inference on the emulated rpi4, frugalrt vs ORT aarch64 (module docstring)."""
    import tempfile
    from pathlib import Path

    import onnx

    import frugalrt
    from benchmarks.bench_models import EMU_BUDGET, ORT_AARCH64, EmulatedCounter, emulation_unavailable

    reason = emulation_unavailable()
    if reason:
        print(f"ops: emulated rpi4 counts skipped: {reason}", file=sys.stderr)
        return []
    rows = []
    with tempfile.TemporaryDirectory(prefix="frugalrt-bench-ops-") as tmp:
        counter = EmulatedCounter(tmp, 3e7 if quick else EMU_BUDGET)
        for i, (name, model, feeds) in enumerate(cases(quick, np.random.default_rng(0))):
            if len(feeds) != 1:  # the device runner feeds one input
                continue
            path = Path(tmp) / f"op{i}.onnx"
            onnx.save(model, path)
            artifact = frugalrt.compile(path, "rpi4", Path(tmp) / f"op{i}")
            x = next(iter(feeds.values()))
            ours, theirs = (counter.per_inference(kind, target, x)["instructions"]
                            for kind, target in (("tvm", str(artifact.lib_path)), ("ort", str(path))))
            ratio = theirs / ours
            rows.append({"bench": "ops-rpi4", "case": name, "device": "qemu-aarch64 -cpu cortex-a72",
                         "instructions": {"frugalrt": ours, f"ORT {ORT_AARCH64}": theirs}, "ratio": ratio,
                         "within_1_5x": ratio >= TARGET_RATIO})
            print(f"ops {name} on rpi4: frugalrt {ours:,} vs ORT {theirs:,} instructions per inference: "
                  f"x{ratio:.2f}", file=sys.stderr)
    print(format_emulated(rows))
    return rows


def format_emulated(rows: list[dict]) -> str:
    lines = ["| op (rpi4, whole inference) | frugalrt instructions | ORT aarch64 instructions | x frugalrt |",
             "|---|---:|---:|---:|"]
    for r in rows:
        ours, theirs = r["instructions"].values()
        lines.append(f"| {r['case']} | {ours:,} | {theirs:,} | {r['ratio']:.2f} |")
    return "\n".join(lines)
