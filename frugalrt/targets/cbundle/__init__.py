"""C bundles: a Relax module as a self-contained C project for microcontrollers and 32-bit ARM.

``build_bundle`` writes TVM's C-codegen kernels, a generated straight-line driver over the module's
``call_tir`` bindings (batch specialized to 1), the weights as flash constants, a static
lifetime-planned activation arena, the runtime shim, board files, a Makefile and a README.
``check_bundle_model`` refuses, before anything is built, what the bundle cannot run (non-float32
inputs or outputs, a fixed batch above 1, a ``board`` that is not a Cortex-M board).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional, Sequence

import numpy as np

from frugalrt._atomic import atomic_path
from frugalrt.targets.cbundle import emit, project
from frugalrt.targets.cbundle.arena import lifetimes_of, plan_arena
from frugalrt.targets.cbundle.boards import PLATFORMS, platform_for
from frugalrt.targets.cbundle.check import check_bundle_model
from frugalrt.targets.cbundle.memory import check_fits, format_table
from frugalrt.targets.cbundle.program import KERNEL_PREFIX, Program, compile_kernels, extract_program

__all__ = ["build_bundle", "check_bundle_model", "write_inputs"]

_INCLUDES = re.compile(r'(#define TVM_EXPORTS\n)?(#include "tvm/[^"]+"\n)+')
_SYMBOL = re.compile(r"^TVM_DLL int32_t (__tvm_ffi_(\w+))\(", re.M)


def make_plan(program: Program, workspace_bytes: int) -> dict:
    """The buffer plan (JSON-able): arena slots, constants, and the sizes memory checks use."""
    planned = lambda n: program.tensors[n].kind == "arena"  # noqa: E731
    lifetimes = lifetimes_of(program.steps, planned)
    slots, arena = plan_arena({n: program.tensors[n].nbytes for n in lifetimes}, lifetimes)
    buffers = [{"name": s.name, "nbytes": s.nbytes, "offset": s.offset, "first": s.first, "last": s.last,
                "kind": "arena", "shape": list(program.tensors[s.name].shape)} for s in slots]
    for kind in ("input", "output", "const"):
        buffers += [{"name": t.name, "nbytes": t.nbytes, "kind": kind, "shape": list(t.shape), "dtype": t.dtype}
                    for t in program.tensors.values() if t.kind == kind]
    consts = [program.tensors[n] for n in program.consts]
    return {"buffers": buffers, "slots": slots, "arena_bytes": arena, "workspace_bytes": workspace_bytes,
            "unplanned_bytes": sum(s.nbytes for s in slots),
            "weights_bytes": sum(t.nbytes for t in consts),
            "binary_weights_bytes": sum(t.nbytes for t in consts if np.dtype(t.dtype).kind in "ui"),
            "io_bytes": 4 * sum(program.tensors[n].nbytes // 4 for n in program.inputs + program.outputs),
            "num_kernels": len({s.kernel for s in program.steps}), "num_steps": len(program.steps),
            "steps": [{"kernel": s.kernel, "args": s.args, "nodes": s.nodes} for s in program.steps]}


def _named_program(model, c_target) -> Program:
    """Import ``model`` and extract its program, each step named by the ONNX nodes its kernel computes
    (:func:`frugalrt.targets.opnames.recorded`: the kernel calls of the lowered ``main`` are the steps,
    in order), so that the static runner reports per-op times by node; unnamed if it could not follow."""
    from frugalrt.targets import opnames
    from frugalrt.targets.importer import import_onnx

    with opnames.recorded() as kernels:
        program = extract_program(import_onnx(model, c_target))
    if [KERNEL_PREFIX + k["kernel"] for k in kernels] == [s.kernel for s in program.steps]:
        for step, kernel in zip(program.steps, kernels):
            step.nodes = kernel["nodes"]
    return program


def write_inputs(path: str | os.PathLike, inputs: Sequence[np.ndarray], repeat: int = 1) -> int:
    """Write the test firmware's input file (header n_samples, repeat; float32 samples); returns n."""
    batch = int(inputs[0].shape[0])
    flat = [np.ascontiguousarray(x, dtype=np.float32).reshape(batch, -1) for x in inputs]
    with open(path, "wb") as f:
        f.write(np.array([batch, repeat], dtype=np.uint32).tobytes())
        f.write(np.concatenate(flat, axis=1).tobytes())
    return batch


def build_bundle(mod, target, out_dir: str | os.PathLike, *, board: Optional[str] = None,
                 golden: Optional[tuple[list[np.ndarray], list[np.ndarray]]] = None) -> dict:
    """Write a self-contained C project for ``mod`` (a Relax IRModule) into ``out_dir``.

    ``mod`` may also be an ONNX model or its path: it is then imported here for TVM's C target
    (``frugalrt.targets.importer.import_onnx``) and its golden vectors are read from its metadata.
    ``target`` is a DeviceTarget (its name picks the default platform); ``board`` names the
    platform checked for fit (e.g. ``netduinoplus2``: refused with the figures if the estimate of
    flash or RAM exceeds it). ``golden`` inputs go to ``test/frugalrt_in.bin`` for ``make run``.
    Returns the bundle description also written to ``plan.json``.
    """
    import tvm

    platform = platform_for(target.name, board)
    c_target = tvm.target.Target({"kind": "c"})
    if not isinstance(mod, tvm.IRModule):
        from frugalrt.export.metadata import read_golden
        from frugalrt.targets.importer import load_model

        model = load_model(mod)
        golden = golden if golden is not None else read_golden(model)
        program = _named_program(model, c_target)
    else:
        program = extract_program(mod)
    source, workspace = compile_kernels(program, c_target)
    plan = make_plan(program, workspace)
    estimate = check_fits(plan, platform)
    symbols = {m.group(2): m.group(1) for m in _SYMBOL.finditer(source)}
    slots = plan.pop("slots")
    plan.update(target=target.name, board=platform.name, estimate=estimate,
                inputs=[list(program.tensors[n].shape) for n in program.inputs],
                outputs=[list(program.tensors[n].shape) for n in program.outputs])
    platforms = [platform.name] + [p for p in PLATFORMS if p != platform.name
                                   and PLATFORMS[p].bare_metal == platform.bare_metal]
    with atomic_path(out_dir, is_dir=True) as out:
        (out / "kernels.c").write_text(_INCLUDES.sub('#include "frugalrt_runtime.h"\n', source, count=1))
        (out / "model.h").write_text(emit.model_h(program, plan["arena_bytes"]))
        (out / "model.c").write_text(emit.model_c(program, slots, plan["arena_bytes"], workspace, symbols))
        (out / "weights.c").write_text(emit.weights_c(program))
        for name in ("frugalrt_runtime.c", "frugalrt_runtime.h"):
            shutil.copyfile(project.FILES / name, out / name)
        project.copy_headers(out / "include")
        (out / "test").mkdir()
        shutil.copyfile(project.FILES / "frugalrt_main.c", out / "test" / "frugalrt_main.c")
        if golden is not None:
            write_inputs(out / "test" / "frugalrt_in.bin", [x[:1] for x in golden[0]])
        (out / "boards").mkdir()
        shutil.copyfile(project.FILES / "startup_cortexm.c", out / "boards" / "startup_cortexm.c")
        for p in PLATFORMS.values():
            if p.bare_metal:
                (out / "boards" / f"{p.name}.ld").write_text(project.linker_script(p))
        (out / "Makefile").write_text(project.makefile(platform.name))
        (out / "plan.json").write_text(json.dumps(plan, indent=1))
        (out / "README.md").write_text(project.readme("model", target.name, platforms, format_table(plan)))
    return plan
