"""Emit a TE kernel into Relax and give it a generic schedule for its target family.

Generic means correct everywhere and reasonable on CPUs: spatial loops fused and run in
parallel, the innermost static loop of element-wise blocks vectorized (LLVM CPU); left to
dlight's default GPU rules (CUDA, during ``tvm.compile``); plain loops (C, microcontrollers).
Kernels are marked opaque so Relax's FuseOps never merges a scheduled kernel with its neighbours.
"""
from __future__ import annotations

from typing import Callable

from tvm import relax, s_tir, tirx

from frugalrt.targets.kernels import target_family

_OPAQUE = 8  # relax OpPatternKind.kOpaque
_VECTOR_LANES = {"x86": 8, "aarch64": 4, "arm": 4}


def emit_kernel(bb: relax.BlockBuilder, fcompute: Callable, args: list, name: str, target,
                schedule: Callable | None = None) -> relax.Expr:
    """``bb.emit_te(fcompute, *args)``, then schedule the new PrimFunc (default: :func:`schedule_generic`)."""
    var = bb.emit_te(fcompute, *args, primfunc_name_hint=name)
    gv = bb.lookup_binding(var).args[0]  # the call_tir's PrimFunc
    func = (schedule or schedule_generic)(bb.get()[gv], target)
    bb.update_func(gv, func.with_attr("op_pattern", _OPAQUE))
    return var


def schedule_generic(func: tirx.PrimFunc, target) -> tirx.PrimFunc:
    family = target_family(target)
    if family not in _VECTOR_LANES:
        return func  # C / MCU: plain loops; CUDA: dlight schedules it during tvm.compile
    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        _parallel_vectorize(sch, block, _VECTOR_LANES[family])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _parallel_vectorize(sch: s_tir.Schedule, block, lanes: int) -> None:
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    n_spatial = sum(1 for it in iters if it.iter_type == tirx.IterVar.DataPar)
    if n_spatial == 0 or len(loops) != len(iters):
        return
    spatial = list(loops[:n_spatial])
    inner = sch.get(spatial[-1]).extent
    if n_spatial == len(iters) and isinstance(inner, tirx.IntImm) and inner.value % lanes == 0 \
            and inner.value >= lanes:
        outer, vec = sch.split(spatial[-1], factors=[None, lanes])
        sch.vectorize(vec)
        spatial[-1] = outer
    sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
