"""The fused activation of the ``ai.frugalrt`` ops (attribute ``activation``, docs/ops.md), for every
lowering and target at once.

A lowering emits its kernel as usual; :func:`apply` then rewrites a copy of that kernel so that
each value it stores into its output goes through the activation first (``max(v, 0)`` or
``min(max(v, lo), hi)``, on vectors as on scalars). That is exact only when the kernel never
reads its output back (each store is then a final value), which is checked; a kernel that does,
or a lowering that emits more than one call, gets the activation as a separate Relax op instead,
computing the same values. The copy is a new PrimFunc: a kernel shared by nodes with other
activations is left as it is.
"""
from __future__ import annotations

from typing import Any, Callable

import tvm
import tvm_ffi
from tvm import relax, tirx

from frugalrt.runtime.reference import ACTIVATIONS


def _scalar_bound(value: float, like) -> Any:
    """``value`` as a constant of ``like``'s float dtype (broadcast for vector values)."""
    dtype = tvm.DataType(str(like.ty))
    const = tirx.const(value, f"float{dtype.bits}")
    return tirx.Broadcast(const, dtype.lanes) if dtype.lanes > 1 else const


def _tir(activation: str, lo: float, hi: float) -> Callable[[Any], Any]:
    if activation == "relu":
        return lambda v: tirx.max(v, _scalar_bound(0.0, v))
    return lambda v: tirx.min(tirx.max(v, _scalar_bound(lo, v)), _scalar_bound(hi, v))


def _relax(x: relax.Expr, activation: str, lo: float, hi: float) -> relax.Expr:
    if activation == "relu":
        return relax.op.nn.relu(x)
    return relax.op.minimum(relax.op.maximum(x, relax.const(lo, "float32")), relax.const(hi, "float32"))


def reads_output(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` loads from its last parameter (its output buffer)."""
    out, found = func.params[-1], []
    tvm_ffi.structural_walk(func.body, (tvm.ir.TensorLoad, lambda n: found.append(n.source.same_as(out))))
    return any(found)


def with_activation(func: tirx.PrimFunc, activation: str, lo: float = float("-inf"),
                    hi: float = float("inf")) -> tirx.PrimFunc:
    """``func`` with every store into its output buffer passed through the activation."""
    out, act = func.params[-1], _tir(activation, lo, hi)

    def store(node):
        if node.buffer.same_as(out):
            return tirx.BufferStore(node.buffer, act(node.value), node.indices)
        return node

    return tvm_ffi.structural_map(func, (tvm.tirx.stmt.BufferStore, store))


def apply(bb: relax.BlockBuilder, out: relax.Expr, attrs: dict) -> relax.Expr:
    """``out`` (a lowering's result) with the node's fused activation applied (module docstring)."""
    activation = attrs.get("activation", "")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    if not activation:
        return out
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}")
    lo, hi = float(attrs.get("activation_min", float("-inf"))), float(attrs.get("activation_max", float("inf")))
    call = bb.lookup_binding(out) if isinstance(out, relax.Var) else None
    if isinstance(call, relax.Call) and getattr(call.op, "name", None) == "relax.call_tir" and len(call.args) == 2:
        gv = call.args[0]
        func = bb.get()[gv]
        if isinstance(func, tirx.PrimFunc) and not reads_output(func):
            fused = with_activation(func, activation, lo, hi).without_attr("global_symbol")
            new = bb.add_func(fused, f"{gv.name_hint}_{activation}")
            return bb.emit(relax.call_tir(new, call.args[1], out.ty))
    return bb.emit(_relax(out, activation, lo, hi))
