"""Relax passes ``frugalrt.compile`` runs before ``tvm.compile`` (graph-level rewrites in one place).

The ONNX-level folds come first (:func:`frugalrt.export.fold.optimize_graph`, run by the importer:
BatchNorm and constant per-channel affines folded into the neighbouring op, identity reshapes and
sign-preserving clips before binary ops removed). On the imported Relax module:

1. :func:`fuse` (LLVM targets: ``tvm.compile``'s default CPU pipeline legalizes ops but neither
   folds constants nor fuses) -- ``DecomposeOpsForInference`` (a BatchNorm left over -> element-wise
   ops), ``CanonicalizeBindings``, ``LegalizeOps``, ``AnnotateTIROpPattern``, ``FoldConstant``
   (constant weight transposes, ``Clip``'s isnan/where on its bounds), ``FuseOps`` + ``FuseTIR``
   (element-wise chains into one kernel, and into the preceding standard matmul/conv),
   ``DeadCodeElimination``. The frugal kernels are opaque (``kernels/schedules.py``): one call each.
2. :func:`plan_memory` (LLVM and CUDA) -- ``main`` gets ``tir_var_upper_bound`` on its batch, so
   that ``StaticPlanBlockMemory`` (in ``tvm.compile``) gives every intermediate a storage of
   constant size: no size computation per call, and the VM's pooled allocator hands back the same
   buffers call after call. ``main`` then takes batches up to the bound only (TVM refuses more:
   "storage allocation failure"); the bound is lowered (never below 1) so that the planned storage
   stays under ``PLANNED_BYTES_MAX`` bytes, and recorded in the artifact's manifest.

C bundles plan their own static arena (``cbundle/program.py``, batch 1) and get neither.
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx

DEFAULT_BATCH_BOUND = 4096
PLANNED_BYTES_MAX = 64 << 20  # planned storage of main at the bound (held by the VM's pool between calls)
BOUND_ATTR = "frugalrt.batch_bound"


def fuse(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize, fold constants and fuse element-wise chains (step 1 of the module docstring)."""
    t = relax.transform
    seq = tvm.transform.Sequential([
        t.DecomposeOpsForInference(), t.CanonicalizeBindings(), t.LegalizeOps(), t.AnnotateTIROpPattern(),
        t.FoldConstant(), t.FuseOps(), t.FuseTIR(), t.DeadCodeElimination(["main"]),
    ])
    with target:
        return seq(mod)


def optimize(mod: tvm.IRModule, target: tvm.target.Target, batch_bound: int = DEFAULT_BATCH_BOUND) -> tvm.IRModule:
    """The passes of the module docstring for ``target`` (a ``tvm.target.Target``)."""
    if target.kind.name == "llvm":
        mod = fuse(mod, target)
    return plan_memory(mod, target, batch_bound)


def batch_var(func: relax.Function) -> tirx.Var | None:
    """The one symbolic dimension of ``func``'s parameters (the dynamic batch), else None."""
    found: dict[str, tirx.Var] = {}
    for param in func.params:
        for dim in getattr(param.ty, "shape", None) or []:
            if isinstance(dim, tirx.Var):
                found.setdefault(dim.name, dim)
    return next(iter(found.values())) if len(found) == 1 else None


def _with_bound(mod: tvm.IRModule, batch: tirx.Var, bound: int) -> tvm.IRModule:
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    mod["main"] = mod["main"].with_attr("tir_var_upper_bound", {batch.name: bound}).with_attr(BOUND_ATTR, bound)
    return mod


def planned_bytes(mod: tvm.IRModule, target: tvm.target.Target, batch: tirx.Var, bound: int) -> int:
    """Bytes of the constant-size storage ``StaticPlanBlockMemory`` gives ``main`` at ``bound``
    (the prefix of ``tvm.compile``'s pipeline, run on a copy)."""
    t = relax.transform
    seq = tvm.transform.Sequential([t.LegalizeOps(), t.RewriteDataflowReshape(), t.ToNonDataflow(),
                                    t.RemovePurityChecking(), t.CallTIRRewrite(), t.StaticPlanBlockMemory()])
    with target:
        planned = seq(_with_bound(mod, batch, bound))
    total = 0

    def visit(e):
        nonlocal total
        if getattr(getattr(e, "op", None), "name", None) == "relax.memory.alloc_storage":
            size = e.args[0]
            if isinstance(size, relax.ShapeExpr) and all(isinstance(v, tirx.IntImm) for v in size.values):
                total += int(size.values[0]) if len(size.values) == 1 else 0

    relax.analysis.post_order_visit(planned["main"].body, visit)
    return total


def batch_bound_for(mod: tvm.IRModule, target: tvm.target.Target, requested: int = DEFAULT_BATCH_BOUND) -> int | None:
    """The batch bound :func:`plan_memory` gives ``mod``: ``requested``, lowered so that the planned
    storage stays under ``PLANNED_BYTES_MAX``; None when ``main`` has no single symbolic batch or
    ``requested`` < 1 (no bound: dynamic allocation)."""
    batch = batch_var(mod["main"])
    if batch is None or requested < 1:
        return None
    one, two = (planned_bytes(mod, target, batch, b) for b in (1, 2))
    per_row, fixed = two - one, 2 * one - two
    if per_row <= 0 or fixed + per_row * requested <= PLANNED_BYTES_MAX:
        return requested
    return max(1, min(requested, (PLANNED_BYTES_MAX - max(fixed, 0)) // per_row))


def plan_memory(mod: tvm.IRModule, target: tvm.target.Target, batch_bound: int = DEFAULT_BATCH_BOUND) -> tvm.IRModule:
    """Bound ``main``'s batch for static memory planning (step 2 of the module docstring). A ``main``
    with static shapes is planned statically by ``tvm.compile`` already and is left as it is, as is
    one with more than one symbolic dimension, or any with ``batch_bound`` < 1."""
    bound = batch_bound_for(mod, target, batch_bound)
    return mod if bound is None else _with_bound(mod, batch_var(mod["main"]), bound)


def planned_bound(mod: tvm.IRModule) -> int | None:
    """The batch bound :func:`plan_memory` gave ``mod`` (None: dynamic allocation, any batch)."""
    attrs = mod["main"].attrs
    return int(attrs[BOUND_ATTR]) if attrs and BOUND_ATTR in attrs else None
