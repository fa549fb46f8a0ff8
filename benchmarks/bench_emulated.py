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
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

TARGETS = {"rpi4": "qemu-aarch64 (Cortex-A72)", "cortex-m4": "qemu-system-arm mps2-an386 (Cortex-M4F)"}


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

    x = np.random.default_rng(1).standard_normal([1, *x_shape]).astype(np.float32)
    result = count_instructions(artifact.lib_path, [x], runs=2)
    return result["instructions"]


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
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| case | device | frugalrt instructions | dense fp32 instructions | x frugalrt |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "instructions" in r:
            i = r["instructions"]
            lines.append(f"| {r['case']} | {r['device']} | {i['frugalrt']:,} | {i['TVM dense fp32']:,} | {r['ratio']:.1f} |")
    return "\n".join(lines)
