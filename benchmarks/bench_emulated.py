"""Executed-instruction counts on emulated ARM devices: frugalrt kernels vs TVM-compiled dense twins.

qemu wall time says nothing about speed on the real core (NEON / VFP are emulated in software),
but the number of guest instructions one inference executes is exact and deterministic. Each
case is a single-op ONNX model and its float32 dense equivalent (the same layer as a plain
MatMul / Conv), both compiled by ``frugalrt.compile`` for the same target:

* ``rpi4`` (AArch64 Cortex-A72 shared library): ``frugalrt.runtime.emulator.count`` counts the
  instructions executed inside the model library under qemu-aarch64 (kernels only);
* ``cortex-m4`` (C bundle, mps2-an386 firmware): ``frugalrt.targets.cbundle.run.count_instructions``
  counts one ``model_run`` under qemu-system-arm (kernels and libgcc/libm helpers included).

"x frugalrt" = dense instructions / frugalrt instructions (> 1: frugalrt executes fewer).
Instructions, not cycles: there is no cycle model for these cores.

Binary CNN (``bench_models.binary_cnn``: float 3->64 stem, six binary 3x3 convs 64->...->256, each
with BatchNorm, 32x32 input), issue #13: each binary conv alone on ``rpi4`` in binary MACs
(O * OH * OW * C * kh * kw) per instruction of its kernel, and whole inferences (the process's
every instruction, VM and Python included: ``bench_models.EmulatedCounter``) of the frugal CNN
against its float dense twin in aarch64 ONNX Runtime and LiteRT (XNNPACK; the .tflite written here
with LiteRT's own flatbuffers schema module, no TensorFlow).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.bench_models import EmulatedCounter, ensure_aarch64_site

TARGETS = {"rpi4": "qemu-aarch64 (Cortex-A72)", "cortex-m4": "qemu-system-arm mps2-an386 (Cortex-M4F)"}
CONV_MACS_TARGET = 25.0  # issue #13: binary MACs per instruction of each 3x3 binary conv (>= 64 channels)
LITERT_TARGET = 8.0  # issue #13: x fewer whole-inference instructions than the dense twin in LiteRT
LITERT_AARCH64 = "2.0.3"  # issue #13 named 1.4.0, absent from this machine's package index; 2.3.0 segfaults
# under qemu-aarch64 7.2 as soon as an Interpreter is built (the same .tflite runs in x86 2.3.0)


def _model(op: str, x_shape: list, consts: dict, attrs: dict, domain: str):
    from onnx import TensorProto, helper, numpy_helper

    import frugalrt.export.schemas  # noqa: F401  (registers ai.frugalrt)

    node = helper.make_node(op, ["X", *consts], ["Y"], domain=domain, **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", *x_shape])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def cases(quick: bool) -> dict:
    """name -> (frugal model, dense model, input shape without batch)."""
    from frugalrt.runtime.reference import pack_bits

    rng = np.random.default_rng(0)
    n = 256
    tw = (rng.standard_normal((8, n // 2, 2, 2)) / np.sqrt(2)).astype(np.float32)
    dense = rng.standard_normal((n, n)).astype(np.float32)
    out = {
        f"butterfly N={n}": (_model("Butterfly", [n], {"twiddles": tw}, {"out_features": n}, "ai.frugalrt"),
                             _model("MatMul", [n], {"W": dense}, {}, ""), [n]),
        f"binary GEMM {n}x{n}": (_model("BinaryGemm", [n], {"W_packed": pack_bits(dense), "scale": np.abs(dense).mean(1)},
                                        {"in_features": n}, "ai.frugalrt"),
                                 _model("MatMul", [n], {"W": dense}, {}, ""), [n]),
    }
    if not quick:
        c, hw = 32, 16
        w = rng.standard_normal((c, c, 3, 3)).astype(np.float32)
        out[f"binary conv3x3 {hw}x{hw}x{c}->{c}"] = (
            _model("BinaryConv", [c, hw, hw], {"W_packed": pack_bits(w.reshape(c, -1)), "scale": np.abs(w).mean((1, 2, 3))},
                   {"in_channels": c, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, "ai.frugalrt"),
            _model("Conv", [c, hw, hw], {"W": w}, {"pads": [1, 1, 1, 1]}, ""), [c, hw, hw])
    return out


def count(model, target: str, x_shape: list, tmp: str) -> int:
    import onnx

    from frugalrt.targets.compile import compile as frugal_compile

    path = tempfile.mkdtemp(dir=tmp)
    onnx.save(model, os.path.join(path, "model.onnx"))
    artifact = frugal_compile(os.path.join(path, "model.onnx"), target, os.path.join(path, "artifact"))
    if target == "cortex-m4":
        from frugalrt.targets.cbundle.run import count_instructions

        return count_instructions(artifact, "mps2-an386")["instructions"]
    from frugalrt.runtime.emulator.count import count_instructions

    rng = np.random.default_rng(1)
    packed = model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8  # packed signs
    x = (rng.integers(0, 256, [1, *x_shape], dtype=np.uint8) if packed
         else rng.standard_normal([1, *x_shape]).astype(np.float32))
    result = count_instructions(artifact.lib_path, [x], runs=2)
    return result["instructions"]


def binary_cnn_convs(tmp: str) -> list[tuple[str, object, list, int]]:
    """Each BinaryConv of the exported binary CNN (BatchNorms folded in; packed activations between
    binary layers, as the export writes them) as a one-node model: (name, model, input shape without
    batch, binary MACs per sample)."""
    import onnx
    import torch

    import frugalrt
    from benchmarks.bench_models import binary_cnn
    from frugalrt.export.single_op import single_op_model

    model, shape = binary_cnn(dense=False)
    path = os.path.join(tmp, "binary_cnn.onnx")
    frugalrt.export(model.eval(), (torch.randn(2, *shape),), path)
    graph = onnx.shape_inference.infer_shapes(onnx.load(path)).graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim[1:]]
            for v in [*graph.input, *graph.value_info, *graph.output]}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    out = []
    for i, node in enumerate(n for n in graph.node if n.op_type == "BinaryConv"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        consts = {k: inits[v] for k, v in zip(("W_packed", "scale", "B"), node.input[1:]) if v}
        x_dims, y_dims = dims[node.input[0]], dims[node.output[0]]
        (h, w), (oh, ow) = [d[:2] if attrs.get(p) else d[1:] for d, p in ((x_dims, "input_packed"),
                                                                          (y_dims, "output_packed"))]
        c, o = attrs["in_channels"], consts["W_packed"].shape[0]
        kh, kw = attrs["kernel_shape"]
        stride = attrs.get("strides", [1, 1])[0]
        io = "".join(s for s, p in ((" packed in", "input_packed"), (" packed out", "output_packed")) if attrs.get(p))
        out.append((f"binary conv {i + 1}: {kh}x{kw} {c}->{o} s{stride} {h}x{w}{io}",
                    single_op_model("BinaryConv", x_dims, consts, attrs), x_dims, o * oh * ow * c * kh * kw))
    return out


def conv_macs_rows(tmp: str) -> list[dict]:
    rows = []
    for name, model, x_shape, macs in binary_cnn_convs(tmp):
        instructions = count(model, "rpi4", x_shape, tmp)
        rows.append({"bench": "emulated-convs", "case": name, "device": TARGETS["rpi4"], "instructions": instructions,
                     "binary_macs": macs, "macs_per_instruction": macs / instructions, "target": CONV_MACS_TARGET})
        print(f"emulated {name} on rpi4: {instructions:,} instructions, {macs / instructions:.1f} binary MACs "
              f"per instruction (target {CONV_MACS_TARGET})", file=sys.stderr)
    return rows


def whole_cnn_row(tmp: str, quick: bool) -> dict:
    """Whole inferences of the binary CNN (rpi4 artifact) vs its dense twin in aarch64 ORT (``bench_models``)
    and in aarch64 LiteRT."""
    from benchmarks.bench_models import EMU_BUDGET, _export_and_compile, count_case

    m = _export_and_compile("binary CNN", tmp, emulated=True)
    counter = LiteRTCounter(tmp, 3e7 if quick else EMU_BUDGET)
    row = {**count_case("binary CNN", 1, m, counter), "bench": "emulated-cnn"}
    try:
        litert = litert_whole(counter, m["dense"], m["shape"], tmp)
    except Exception as e:  # noqa: BLE001  (report why, keep the ORT column)
        print(f"emulated binary CNN: LiteRT failed ({type(e).__name__}: {str(e)[:300]})", file=sys.stderr)
        return {**row, "litert_skipped": f"{type(e).__name__}: {str(e)[:300]}"}
    ours = row["instructions"]["frugalrt"]["instructions"]
    row["instructions"][f"LiteRT {LITERT_AARCH64} dense twin"] = litert
    row["litert_ratio"] = litert["instructions"] / ours
    print(f"emulated binary CNN on rpi4: LiteRT {litert['instructions']:,} instructions per inference: "
          f"x{row['litert_ratio']:.2f} vs frugalrt (target {LITERT_TARGET}); output sum {litert['out']:.6g} vs "
          f"torch {litert['torch_out']:.6g}", file=sys.stderr)
    return row


_LITERT_RUNNER = r'''
"""Run a .tflite NUMBER times with LiteRT (one thread, default XNNPACK delegate), numpy in and out."""
import sys

import numpy as np
from ai_edge_litert.interpreter import Interpreter

path, inputs, number = sys.argv[2], sys.argv[3], int(sys.argv[4])
x = np.ascontiguousarray(np.load(inputs))
interpreter = Interpreter(model_path=path, num_threads=1)
interpreter.allocate_tensors()
i, o = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
for _ in range(number):
    interpreter.set_tensor(i, x)
    interpreter.invoke()
    y = interpreter.get_tensor(o)
print("FRUGALRT_OUT", float(np.asarray(y, np.float64).sum()), flush=True)
'''


def ensure_litert_aarch64() -> Path:
    """ai-edge-litert LITERT_AARCH64 for the device Python (``bench_models.ensure_aarch64_site``)."""
    return ensure_aarch64_site(f"litert{LITERT_AARCH64}", "ai_edge_litert", f"ai-edge-litert=={LITERT_AARCH64}")


class LiteRTCounter(EmulatedCounter):
    """``bench_models.EmulatedCounter`` that also runs kind ``"litert"``: a .tflite in aarch64 LiteRT."""

    def command(self, kind: str, path: str, inputs: str, number: int) -> list[str]:
        if kind != "litert":
            return super().command(kind, path, inputs, number)
        script = self.tmp / "litert_runner.py"
        script.write_text(_LITERT_RUNNER)
        cmd = self.userland.command(str(script), kind, path, inputs, str(number),
                                    env={"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
        cmd[cmd.index(f"PYTHONPATH={self.userland.site}")] = f"PYTHONPATH={ensure_litert_aarch64()}"
        return cmd


def litert_whole(counter: LiteRTCounter, dense, shape: list, tmp: str) -> dict:
    """Whole-inference instructions of ``dense`` as a .tflite in LiteRT, batch 1 (NHWC input), and the
    output sums of one run there and in torch (a check that the file computes the same model)."""
    import re
    import subprocess

    import torch

    path = Path(tmp) / "dense_twin.tflite"
    write_dense_cnn_tflite(dense, shape, path, ensure_litert_aarch64())
    x = np.random.default_rng(1).standard_normal([1, *shape]).astype(np.float32)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    result = counter.per_inference("litert", str(path), nhwc)
    np.save(Path(tmp) / "litert_check.npy", nhwc)
    out = subprocess.run(counter.command("litert", str(path), str(Path(tmp) / "litert_check.npy"), 1),
                         capture_output=True, text=True, timeout=600).stdout
    with torch.no_grad():
        want = float(dense(torch.from_numpy(x)).double().sum())
    return {**result, "out": float(re.search(r"FRUGALRT_OUT (\S+)", out).group(1)), "torch_out": want}


def write_dense_cnn_tflite(dense, shape: list, path: Path, site: Path) -> None:
    """``bench_models.binary_cnn(dense=True)`` (Conv2d + BatchNorm2d stages, global average pool, Linear) as a
    float32 NHWC .tflite: BatchNorms folded into the convs, stride-1 "same" convs as SAME, other padded
    convs as an explicit PAD (PyTorch's symmetric padding) + VALID. Written with the flatbuffers schema
    module LiteRT ships (``ai_edge_litert/schema_py_generated.py``, pure Python), no TensorFlow."""
    import importlib.util

    import flatbuffers
    from torch import nn

    spec = importlib.util.spec_from_file_location("tflite_schema", site / "ai_edge_litert" / "schema_py_generated.py")
    fb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fb)
    ops = fb.BuiltinOperator
    model = fb.ModelT()
    model.version, model.buffers, model.operatorCodes = 3, [fb.BufferT()], []
    graph = fb.SubGraphT()
    graph.tensors, graph.operators = [], []

    def tensor(dims, data=None, dtype=fb.TensorType.FLOAT32) -> int:
        t = fb.TensorT()
        t.shape, t.type, t.name = list(dims), dtype, f"t{len(graph.tensors)}"
        if data is not None:
            b = fb.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            model.buffers.append(b)
            t.buffer = len(model.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    def op(code, inputs, out_dims, options_type=0, options=None) -> int:
        codes = [c.builtinCode for c in model.operatorCodes]
        if code not in codes:
            oc = fb.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode = code, min(code, 127)
            model.operatorCodes.append(oc)
            codes.append(code)
        o = fb.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = codes.index(code), inputs, [tensor(out_dims)]
        o.builtinOptionsType, o.builtinOptions = options_type, options
        graph.operators.append(o)
        return o.outputs[0]

    c, h, w = shape
    x = graph_input = tensor([1, h, w, c])
    layers = list(dense)
    for conv, bn in ((m, layers[i + 1]) for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)):
        a = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().double()
        weight = (conv.weight.detach().double() * a[:, None, None, None]).permute(0, 2, 3, 1).float().numpy()
        bias = ((conv.bias.detach().double() - bn.running_mean.double()) * a + bn.bias.detach().double()).float().numpy()
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
        same = (sh, sw) == (1, 1) and (kh - 1, kw - 1) == (2 * ph, 2 * pw)
        if not same and (ph or pw):
            h, w = h + 2 * ph, w + 2 * pw
            pads = tensor([4, 2], np.array([[0, 0], [ph, ph], [pw, pw], [0, 0]], np.int32), fb.TensorType.INT32)
            x = op(ops.PAD, [x, pads], [1, h, w, c], fb.BuiltinOptions.PadOptions, fb.PadOptionsT())
        options = fb.Conv2DOptionsT()
        options.padding = fb.Padding.SAME if same else fb.Padding.VALID
        options.strideH, options.strideW = sh, sw
        h, w = (-(-h // sh), -(-w // sw)) if same else ((h - kh) // sh + 1, (w - kw) // sw + 1)
        c = weight.shape[0]
        x = op(ops.CONV_2D, [x, tensor(weight.shape, weight), tensor(bias.shape, bias)], [1, h, w, c],
               fb.BuiltinOptions.Conv2DOptions, options)
    axes = tensor([2], np.array([1, 2], np.int32), fb.TensorType.INT32)
    x = op(ops.MEAN, [x, axes], [1, c], fb.BuiltinOptions.ReducerOptions, fb.ReducerOptionsT())
    linear = layers[-1]
    fc_w, fc_b = linear.weight.detach().numpy(), linear.bias.detach().numpy()
    y = op(ops.FULLY_CONNECTED, [x, tensor(fc_w.shape, fc_w), tensor(fc_b.shape, fc_b)], [1, fc_w.shape[0]],
           fb.BuiltinOptions.FullyConnectedOptions, fb.FullyConnectedOptionsT())
    graph.inputs, graph.outputs = [graph_input], [y]
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def missing_tools() -> list[str]:
    import shutil

    from frugalrt.targets.registry import get_target

    return sorted({tool for t in TARGETS for tool in get_target(t).needs if shutil.which(tool) is None})


def run(args) -> list[dict]:
    try:
        from frugalrt.runtime.emulator import count as _count  # noqa: F401
        from frugalrt.targets.cbundle import run as _run  # noqa: F401
    except ImportError as e:
        return [{"bench": "emulated", "skipped": f"instruction counting unavailable ({e})"}]
    if missing := missing_tools():
        return [{"bench": "emulated", "skipped": f"missing tools: {', '.join(missing)} (apt-get install them)"}]
    rows = []
    with tempfile.TemporaryDirectory(prefix="frugalrt-bench-emu-") as tmp:
        for name, (frugal, dense, x_shape) in cases(args.quick).items():
            for target, device in TARGETS.items():
                try:
                    ours, theirs = count(frugal, target, x_shape, tmp), count(dense, target, x_shape, tmp)
                except Exception as e:  # report and go on: one broken path must not hide the others
                    rows.append({"bench": "emulated", "case": f"{name} on {target}",
                                 "skipped": f"{type(e).__name__}: {str(e)[:300]}"})
                    print(f"emulated {name} on {target}: failed ({type(e).__name__})", file=sys.stderr)
                    continue
                rows.append({"bench": "emulated", "case": f"{name} on {target}", "device": device,
                             "instructions": {"frugalrt": ours, "TVM dense fp32": theirs},
                             "ratio": theirs / ours})
                print(f"emulated {name} on {target}: {ours} vs dense {theirs} instructions", file=sys.stderr)
        if not args.quick:
            rows += _guarded("binary CNN convs", lambda: conv_macs_rows(tmp))
            rows += _guarded("binary CNN whole inference", lambda: [whole_cnn_row(tmp, args.quick)])
    print(format_table(rows))
    return rows


def _guarded(name: str, fn) -> list[dict]:
    """``fn()``'s rows, or one row saying why it failed: one broken path must not hide the others."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        print(f"emulated {name}: failed ({type(e).__name__}: {str(e)[:300]})", file=sys.stderr)
        return [{"bench": "emulated", "case": name, "skipped": f"{type(e).__name__}: {str(e)[:300]}"}]


def format_table(rows: list[dict]) -> str:
    lines = ["| case | device | frugalrt instructions | dense fp32 instructions | x frugalrt |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if r.get("bench") == "emulated" and "instructions" in r:
            i = r["instructions"]
            lines.append(f"| {r['case']} | {r['device']} | {i['frugalrt']:,} | {i['TVM dense fp32']:,} | {r['ratio']:.1f} |")
    convs = [r for r in rows if r.get("bench") == "emulated-convs"]
    if convs:
        lines += ["", "| binary CNN layer (rpi4) | kernel instructions | binary MACs | MACs / instruction | target |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['case']} | {r['instructions']:,} | {r['binary_macs']:,} | {r['macs_per_instruction']:.1f} | "
                  f"{r['target']} |" for r in convs]
    for r in rows:
        if r.get("bench") == "emulated-cnn":
            i = r["instructions"]
            lines += ["", "| binary CNN batch 1, whole inference (rpi4) | instructions | x frugalrt |",
                      "|---|---:|---:|"]
            ours = i["frugalrt"]["instructions"]
            for k, v in i.items():
                n = v["instructions"] if isinstance(v, dict) else v
                lines.append(f"| {k} | {n:,} | {'' if k.startswith('frugalrt') else f'{n / ours:.2f}'} |")
            if "litert_skipped" in r:
                lines.append(f"| LiteRT {LITERT_AARCH64} dense twin | skipped: {r['litert_skipped']} | |")
    return "\n".join(lines)
