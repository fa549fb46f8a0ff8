"""ONNX -> Relax with a domain-aware converter registry for the ``ai.frugalrt`` ops.

Every node is checked before TVM sees the graph: standard-domain ops go to TVM's Relax ONNX
frontend, ``ai.frugalrt`` ops to the lowering registered under (domain, op_type, version), and
anything else is an :class:`UnsupportedOpError` naming domain, op and version. Each ``ai.frugalrt``
node is then checked against its spec, its parameters must be constants and NaN or infinite
weights are refused (:func:`frugalrt.export.spec_check.check_model`), so a malformed model fails in
one line before any Relax is built. The graph is then simplified on a copy
(:func:`frugalrt.export.fold.optimize_graph`: BatchNorm and per-channel constant affines folded into
the neighbouring op, identity reshapes and sign-preserving clips before binary ops removed,
activations fused into the ops and packed sign bits between binary ops where the target's binary
kernels take them, float32 there otherwise: :func:`frugalrt.targets.kernels.binary.packs_activations`),
and custom nodes are renamed to unique op types (``ai.frugalrt::Butterfly@v1``) for the frontend,
which ignores domains.
"""
from __future__ import annotations

import os
from typing import Any

import onnx

from frugalrt.errors import ArtifactError, UnsupportedOpError
from frugalrt.export import fold, schemas, spec_check
from frugalrt.runtime.reference import DOMAIN
from frugalrt.targets.registry import DeviceTarget, tvm_target

STANDARD_DOMAINS = ("", "ai.onnx")


def load_model(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    try:
        return onnx.load(os.fspath(model_or_path))
    except Exception as e:  # noqa: BLE001  (missing file, truncated or not protobuf)
        raise ArtifactError(f"cannot read ONNX model {model_or_path}: {e}") from e


def resolve_version(domain: str, op_type: str, opset_version: int) -> int:
    """The op's version in effect at ``opset_version`` of ``domain`` (the newest one <= it, as in ONNX)."""
    from frugalrt.targets.kernels import known_ops

    versions = known_ops(domain).get(op_type, [])
    newest_known = max((v for vs in known_ops(domain).values() for v in vs), default=0)
    usable = [v for v in versions if v <= opset_version]
    if not usable or opset_version > max(newest_known, schemas.VERSION):
        raise UnsupportedOpError(
            f"unsupported op {domain}::{op_type} (opset version {opset_version}); this frugalrt knows "
            + ", ".join(f"{domain}::{op} v{'/'.join(map(str, vs))}" for op, vs in known_ops(domain).items())
            + ". Upgrade frugalrt or re-export the model with this version's frugalrt.export")
    return max(usable)


def check_ops(model: onnx.ModelProto) -> dict[int, tuple[str, str, int]]:
    """Map node index -> (domain, op_type, version) of each ``ai.frugalrt`` node; raise on unknown ops."""
    from frugalrt.targets.tvm_bridge import standard_op_types

    opsets = {imp.domain or "": imp.version for imp in model.opset_import}
    standard = standard_op_types()
    custom = {}
    for index, node in enumerate(model.graph.node):
        domain = node.domain or ""
        if domain in STANDARD_DOMAINS:
            if node.op_type not in standard:
                version = opsets.get("", opsets.get("ai.onnx", "?"))
                raise UnsupportedOpError(f"unsupported op ai.onnx::{node.op_type} (opset {version}, node "
                                         f"{node.name!r}): TVM's ONNX frontend cannot convert it")
        elif domain == DOMAIN:
            if domain not in opsets:
                raise UnsupportedOpError(f"node {node.name!r} uses {domain}::{node.op_type} but the model "
                                         f"imports no {domain} opset")
            custom[index] = (domain, node.op_type, resolve_version(domain, node.op_type, opsets[domain]))
        else:
            raise UnsupportedOpError(f"unsupported op {domain}::{node.op_type} (domain {domain!r}, version "
                                     f"{opsets.get(domain, '?')}, node {node.name!r}): frugalrt compiles the "
                                     f"standard ONNX domain and {DOMAIN} only")
    return custom


def import_onnx(model_or_path: onnx.ModelProto | str | os.PathLike, target: Any = None,
                batch: int | None = None, optimize: bool = True):
    """ONNX model -> Relax IRModule (parameters bound as constants, dynamic batch kept).

    ``target`` (a name, DeviceTarget or ``tvm.target.Target``; default ``host``) selects the kernel
    each ``ai.frugalrt`` lowering emits. ``batch`` fixes the symbolic leading dimension of every
    graph input (e.g. 1 for a microcontroller bundle with fully static shapes). ``optimize``: fold
    the graph first (:func:`frugalrt.export.fold.optimize_graph`; the caller's model is not changed).
    """
    import tvm

    from frugalrt.targets import tvm_bridge
    from frugalrt.targets.kernels import get_lowering

    model = load_model(model_or_path)
    if not isinstance(target, tvm.target.Target):
        target = tvm_target(target if isinstance(target, (str, DeviceTarget)) else "host")
    custom = check_ops(model)
    spec_check.check_model(model, error=ArtifactError, constant_parameters=True)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    if optimize:
        from frugalrt.targets.kernels.binary import packs_activations

        fold.optimize_graph(renamed, pack_bits=packs_activations(target))
        custom = check_ops(renamed)  # node indices after the rewrite
    if batch is not None:
        _fix_batch(renamed, batch)
    converters = {}
    for index, key in custom.items():
        node = renamed.graph.node[index]
        unique = f"{key[0]}::{key[1]}@v{key[2]}"
        node.op_type = unique
        converters[unique] = _converter(key, get_lowering(*key), target)
    mod = tvm_bridge.from_onnx(renamed, converters)
    # a fused activation re-emits its op's kernel (kernels/activation.py): drop the first call
    return _symbols_from_names(tvm.relax.transform.DeadCodeElimination(["main"])(mod))


def _symbols_from_names(mod):
    """Give each PrimFunc its (unique) GlobalVar name as symbol: a kernel written in TVMScript and
    added with ``bb.add_func`` keeps its Python name (e.g. two ``kernel``), which would clash."""
    from tvm import tirx

    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc) and func.attrs and "global_symbol" in func.attrs \
                and func.attrs["global_symbol"] != gv.name_hint:
            mod[gv] = func.with_attr("global_symbol", gv.name_hint)
    return mod


def _fix_batch(model: onnx.ModelProto, batch: int) -> None:
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch


def _converter(key: tuple[str, str, int], lowering, target):
    """Adapter from the frontend's converter call to ``lowering.emit`` with constants as numpy."""
    from frugalrt.targets.kernels import activation
    from frugalrt.targets.tvm_bridge import constant_value

    names = [p.name for p in onnx.defs.get_schema(key[1], key[2], key[0]).inputs]

    def convert(bb, inputs: list, attrs: dict[str, Any]):
        consts = {}
        for name, expr in zip(names, inputs):
            value = constant_value(expr) if expr is not None else None
            if value is not None:
                consts[name] = value
        out = lowering.emit(bb, inputs, consts, attrs, target)
        if attrs.get("output_packed"):  # the activation is in the packed sign bits already (docs/ops.md)
            return out
        return activation.apply(bb, out, attrs)

    return convert
