"""The one check of an ``ai.frugalrt`` node against its spec (``docs/ops.md``).

:func:`check_node` checks one node from its attributes and, per input (schema names ``X``,
``twiddles``, ``W_packed``, ``scale``, ``B``), either its constant value (numpy) or its shape
(dims, ``None`` where unknown): twiddles ``[log2 N, N/2, 2, 2]`` with N a power of two vs
``out_features`` and the input width; ``W_packed`` ``[rows, ceil(K/8)]`` uint8 vs ``in_features``
or ``in_channels * kh * kw`` (pad bits 0); ``scale`` and ``B`` one value per output;
``kernel_shape``, ``strides``, ``pads`` (lengths, signs), ``pad_value`` (0 or 1) and an output of at
least 1x1; the input's width or channels; the binary ops' ``input_packed``/``output_packed`` (0 or 1;
a packed X is uint8, ``[batch, ceil(K/8)]`` or ``[batch, H, W, ceil(C/8)]``); finite parameters. A
violation raises ``error`` with one line, e.g.::

    node node_binary_gemm (BinaryGemm): input scale has 3 values, expected 4 (one per output row of W_packed)

:func:`check_model` runs it on every ``ai.frugalrt`` node of a model (constants from initializers
and ``Constant`` nodes, shapes from shape inference or the model's own value_info) and also refuses
NaN in any other initializer. It is called at export, at compile (before TVM sees the model), before an ONNX
Runtime session is made and, with shapes only, by the schemas' shape inference.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import defs, helper, numpy_helper

from frugalrt.errors import ArtifactError, FrugalError, UnsupportedOpError
from frugalrt.runtime.reference import DOMAIN, conv_output_size

# An input is its constant value (numpy), its dims (ints; None, a string or a negative int where
# unknown) or None (absent, or nothing known).
Input = Union[np.ndarray, Sequence[Any], None]
PARAMETERS = ("twiddles", "scale", "B")  # float parameters: must be finite


class _Mismatch(Exception):
    """A rule's finding, without the node label (check_node adds it)."""


# --- the rules of each op (docs/ops.md) ------------------------------------------------------------

def _butterfly(attrs: Mapping, shapes: Mapping, values: Mapping) -> None:
    out = _int_attr(attrs, "out_features")
    tw = shapes.get("twiddles")
    n = None
    if tw is not None:
        if len(tw) != 4 or any(d not in (2, None) for d in tw[2:]):
            raise _Mismatch(f"input twiddles has shape {_fmt(tw)}, expected [log2 N, N/2, 2, 2]")
        stages, half = tw[0], tw[1]
        if half is not None:
            if half < 1 or half & (half - 1):
                raise _Mismatch(f"input twiddles has shape {_fmt(tw)}, expected [log2 N, N/2, 2, 2] with N a "
                                f"power of two (N/2 = {half} gives N = {2 * half})")
            n = 2 * half
            if stages is not None and stages != n.bit_length() - 1:
                raise _Mismatch(f"input twiddles has shape {_fmt(tw)}, expected [{n.bit_length() - 1}, {half}, 2, 2] "
                                f"(log2 N stages for N = {n})")
    if n is not None and out > n:
        raise _Mismatch(f"attribute out_features is {out}, expected <= N = {n} (twiddles {_fmt(tw)})")
    x = shapes.get("X")
    if x is not None:
        if len(x) != 2:
            raise _Mismatch(f"input X has shape {_fmt(x)}, expected [batch, in_features] (rank 2)")
        if x[1] is not None and (x[1] < 1 or (n is not None and x[1] > n)):
            raise _Mismatch(f"input X has width {x[1]}, expected 1 .. N = {n} (twiddles {_fmt(tw)})" if n
                            else f"input X has width {x[1]}, expected >= 1")
    _per_output("B", shapes.get("B"), out, "one per output, out_features")


def _binary_gemm(attrs: Mapping, shapes: Mapping, values: Mapping) -> None:
    k = _int_attr(attrs, "in_features")
    packed = _flag(attrs, "input_packed")
    width, why = ((k + 7) // 8, f"ceil(K / 8) bytes of packed signs, in_features = {k}, input_packed = 1") \
        if packed else (k, "attribute in_features")
    x = shapes.get("X")
    if x is not None:
        if len(x) != 2:
            raise _Mismatch(f"input X has shape {_fmt(x)}, expected [batch, {width}] (rank 2, {why})")
        if x[1] is not None and x[1] != width:
            raise _Mismatch(f"input X has width {x[1]}, expected {width} ({why})")
    rows = _packed(shapes.get("W_packed"), values.get("W_packed"), k, f"K = in_features = {k}", "N")
    _per_output("scale", shapes.get("scale"), rows, "one per output row of W_packed")
    _per_output("B", shapes.get("B"), rows, "one per output row of W_packed")


def _binary_conv(attrs: Mapping, shapes: Mapping, values: Mapping) -> None:
    c = _int_attr(attrs, "in_channels")
    kh, kw = _ints_attr(attrs, "kernel_shape", 2, 1, "[kh, kw]")
    strides = _ints_attr(attrs, "strides", 2, 1, "[sh, sw]")
    pads = _ints_attr(attrs, "pads", 4, 0, "[top, left, bottom, right]")
    _flag(attrs, "pad_value")  # what a padded tap reads: 0 (contributes 0) or +1
    packed = _flag(attrs, "input_packed")
    x = shapes.get("X")
    if x is not None:
        # packed X: [batch, H, W, ceil(C/8)], each pixel's channel signs packed
        ch, h, w = (3, 1, 2) if packed else (1, 2, 3)
        width = (c + 7) // 8 if packed else c
        layout = f"[batch, H, W, {width}] (packed signs, in_channels = {c}, input_packed = 1)" if packed \
            else f"[batch, {c}, H, W] (NCHW, in_channels = {c})"
        if len(x) != 4:
            raise _Mismatch(f"input X has shape {_fmt(x)}, expected {layout}")
        if x[ch] is not None and x[ch] != width:
            raise _Mismatch(f"input X has shape {_fmt(x)}, expected {layout}" if packed
                            else f"input X has {x[1]} channels, expected {c} (attribute in_channels)")
        oh = None if x[h] is None else conv_output_size(x[h], kh, strides[0], pads[0], pads[2])
        ow = None if x[w] is None else conv_output_size(x[w], kw, strides[1], pads[1], pads[3])
        if min(d for d in (oh, ow, 1) if d is not None) < 1:
            raise _Mismatch(f"output {_d(oh)}x{_d(ow)} for input {_d(x[h])}x{_d(x[w])} with kernel_shape "
                            f"[{kh}, {kw}], strides {list(strides)}, pads {list(pads)}, expected at least 1x1")
    kdim = c * kh * kw
    rows = _packed(shapes.get("W_packed"), values.get("W_packed"), kdim,
                   f"K = in_channels * kh * kw = {c} * {kh} * {kw} = {kdim}", "O")
    _per_output("scale", shapes.get("scale"), rows, "one per output row of W_packed")
    _per_output("B", shapes.get("B"), rows, "one per output row of W_packed")


RULES: dict[str, Callable[[Mapping, Mapping, Mapping], None]] = {
    "Butterfly": _butterfly, "BinaryGemm": _binary_gemm, "BinaryConv": _binary_conv}
PACKABLE = ("BinaryGemm", "BinaryConv")  # the ops with input_packed / output_packed


def _flag(attrs: Mapping, name: str) -> bool:
    """A 0/1 attribute (absent: 0): input_packed, output_packed, BinaryConv's pad_value."""
    value = attrs.get(name, 0)
    if not _is_int(value) or value not in (0, 1):
        raise _Mismatch(f"attribute {name} is {_show(value)}, expected 0 or 1")
    return bool(value)


def _packing(op_type: str, attrs: Mapping, dtype: Optional[str]) -> None:
    """The binary ops' packing flags, and X's dtype where known: float32, or uint8 packed signs
    where ``input_packed = 1`` (docs/ops.md, "Packed activations")."""
    if op_type not in PACKABLE:
        return
    packed = _flag(attrs, "input_packed")
    _flag(attrs, "output_packed")
    if dtype is None:
        return
    want = "uint8" if packed else "float32"
    if str(dtype) != want:
        why = "packed signs, attribute input_packed = 1" if want == "uint8" else "input_packed absent or 0"
        raise _Mismatch(f"input X has dtype {dtype}, expected {want} ({why})")


def _int_attr(attrs: Mapping, name: str, minimum: int = 1) -> int:
    value = attrs.get(name)
    if not _is_int(value) or value < minimum:
        found = "missing" if value is None else f"is {_show(value)}"
        raise _Mismatch(f"attribute {name} {found}, expected an integer >= {minimum}")
    return int(value)


def _ints_attr(attrs: Mapping, name: str, length: int, minimum: int, meaning: str) -> list[int]:
    value = attrs.get(name)
    if not (isinstance(value, (list, tuple)) and len(value) == length
            and all(_is_int(v) and v >= minimum for v in value)):
        found = "missing" if value is None else f"is {_show(value)}"
        raise _Mismatch(f"attribute {name} {found}, expected {length} integers >= {minimum} {meaning}")
    return [int(v) for v in value]


def _packed(dims, value: Optional[np.ndarray], k: int, what: str, rows_name: str) -> Optional[int]:
    """Check W_packed [rows, ceil(K/8)] uint8 with zero pad bits; return its row count if known."""
    if dims is None:
        return None
    nbytes = (k + 7) // 8
    if len(dims) != 2 or (dims[1] is not None and dims[1] != nbytes):
        raise _Mismatch(f"input W_packed has shape {_fmt(dims)}, expected [{rows_name}, {nbytes}] "
                        f"(ceil(K / 8) bytes per row, {what})")
    if dims[0] is not None and dims[0] < 1:
        raise _Mismatch(f"input W_packed has shape {_fmt(dims)}, expected at least one row (one per output)")
    if value is not None:
        if value.dtype != np.uint8:
            raise _Mismatch(f"input W_packed has dtype {value.dtype}, expected uint8 (bit-packed signs)")
        used = k % 8
        if used and value.size:
            stray = value[:, -1] >> used
            if stray.any():
                rows = np.flatnonzero(stray)
                raise _Mismatch(f"input W_packed has pad bits set (bits {used}..7 of the last byte, past {what}) "
                                f"in {_count(len(rows), 'row')}, first row {rows[0]}, expected 0 (docs/ops.md)")
    return dims[0]


def _per_output(name: str, dims, n: Optional[int], why: str) -> None:
    if dims is None:
        return
    if len(dims) != 1:
        raise _Mismatch(f"input {name} has shape {_fmt(dims)}, expected [{_d(n, 'N')}] ({why})")
    if n is not None and dims[0] is not None and dims[0] != n:
        raise _Mismatch(f"input {name} has {_count(dims[0], 'value')}, expected {n} ({why})")


# --- one node ---------------------------------------------------------------------------------------

def check_node(op_type: str, attrs: Mapping[str, Any], inputs: Mapping[str, Input], *, node: Optional[str] = None,
               error: type[Exception] = FrugalError, initializers: Mapping[str, str] | None = None,
               finite: bool = True, dtypes: Mapping[str, str] | None = None) -> None:
    """Check one ``ai.frugalrt`` node against docs/ops.md; raise ``error`` with one line on a mismatch:
    ``node NAME (OP): <what is wrong, expected and found>`` (``OP: ...`` if ``node`` is None).

    ``attrs``: the node's attributes with the schema defaults filled in (see :func:`attributes`).
    ``inputs``: schema input name -> constant value (numpy: shape and values are checked), dims
    (shape only) or None (absent or unknown). ``initializers`` maps an input to the initializer
    that holds it, for messages about values. ``finite``: constant twiddles, scale and B must be
    finite (no NaN, no Inf). ``dtypes``: the element types (numpy names) of inputs given by dims,
    where known (X must be uint8 exactly when ``input_packed``). An op that does not exist raises
    :class:`UnsupportedOpError`.
    """
    problem = node_problem(op_type, attrs, inputs, initializers=initializers, finite=finite, node=node,
                           dtypes=dtypes)
    if problem:
        raise error(f"node {node} ({op_type}): {problem}" if node else f"{op_type}: {problem}")


def node_problem(op_type: str, attrs: Mapping[str, Any], inputs: Mapping[str, Input], *,
                 initializers: Mapping[str, str] | None = None, finite: bool = True,
                 node: Optional[str] = None, dtypes: Mapping[str, str] | None = None) -> Optional[str]:
    """What :func:`check_node` would report after ``node NAME (OP): ``, or None if the node is fine."""
    rule = RULES.get(op_type)
    if rule is None:
        label = f"node {node} ({op_type})" if node else op_type
        raise UnsupportedOpError(f"{label}: unknown op {DOMAIN}::{op_type}; {DOMAIN} has " + ", ".join(RULES))
    values = {k: v for k, v in inputs.items() if isinstance(v, np.ndarray)}
    shapes = {k: _dims(v) for k, v in inputs.items()}
    x = inputs.get("X")
    try:
        _packing(op_type, attrs, x.dtype if isinstance(x, np.ndarray) else (dtypes or {}).get("X"))
        rule(attrs, shapes, values)
        _check_activation(attrs)
        for name in PARAMETERS if finite else ():
            bad = nonfinite(values.get(name))
            if bad:
                where = f", initializer '{initializers[name]}'," if initializers and name in initializers else ""
                raise _Mismatch(f"input {name}{where} {bad}, expected finite values")
    except _Mismatch as e:
        return str(e)
    return None


def _check_activation(attrs: Mapping[str, Any]) -> None:
    """The fused activation every op may carry (docs/ops.md, "Fused activation")."""
    from frugalrt.runtime.reference import ACTIVATIONS

    act = attrs.get("activation", "")
    if act not in ACTIVATIONS:
        raise _Mismatch(f"attribute activation is {act!r}, expected one of {', '.join(repr(a) for a in ACTIVATIONS)}")
    lo, hi = attrs.get("activation_min", -np.inf), attrs.get("activation_max", np.inf)
    if act == "clip" and not lo <= hi:  # NaN bounds fail too
        raise _Mismatch(f"attributes activation_min {lo} and activation_max {hi}: expected min <= max")


def attributes(op_type: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` attributes plus the schema's defaults (e.g. BinaryConv's strides and pads)."""
    attrs = {}
    if op_type in RULES:
        for name, attr in _schema(op_type).attributes.items():
            default = attr.default_value
            if default.type != onnx.AttributeProto.UNDEFINED:
                attrs[name] = helper.get_attribute_value(default)
    attrs.update(given)
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}


def nonfinite(array: Optional[np.ndarray], allow_inf: bool = False) -> Optional[str]:
    """``has 2 NaN values (first at index [0, 3])`` for a float array with NaN (or Inf), else None."""
    if array is None or array.dtype.kind not in "fc":
        return None
    bad = np.isnan(array) if allow_inf else ~np.isfinite(array)
    if not bad.any():
        return None
    nan, first = int(np.isnan(array).sum()), np.argwhere(bad)[0].tolist()
    inf = int(bad.sum()) - nan
    what = " and ".join(p for p in (nan and _count(nan, "NaN value"), inf and _count(inf, "infinite value")) if p)
    return f"has {what} (first at index {first})"


# --- a whole model ----------------------------------------------------------------------------------

def check_model(model: onnx.ModelProto, error: type[Exception] = ArtifactError, finite: bool = True,
                constant_parameters: bool = False) -> None:
    """Check every ``ai.frugalrt`` node of ``model`` with :func:`check_node`, in graph order.

    ``finite``: refuse NaN or infinite parameters of those nodes, and NaN in any float initializer
    (infinite constants elsewhere, e.g. -inf attention masks, are legitimate).
    ``constant_parameters``: no input but X may be a graph input (the compiler folds the
    parameters into the kernels; a value computed from constants is left to the lowering).
    Raises ``error`` with one line; :class:`UnsupportedOpError` for an op that does not exist or
    (``constant_parameters``) a parameter that is a graph input.
    """
    graph = model.graph
    consts = _constants(graph)
    graph_inputs = {v.name for v in graph.input} - set(consts)
    types = _declared_types(graph)
    shapes: dict[str, list] | None = None
    checked = set()
    for index, node in enumerate(graph.node):
        if node.domain != DOMAIN:
            continue
        label = node.name or f"#{index}"
        if node.op_type not in RULES:
            check_node(node.op_type, {}, {}, node=label, error=error)  # raises: unknown op
        params = _schema(node.op_type).inputs
        if len(node.input) > len(params):
            raise error(f"node {label} ({node.op_type}): has {len(node.input)} inputs, expected at most "
                        f"{len(params)} ({', '.join(p.name for p in params)})")
        inputs, held = {}, {}
        for i, param in enumerate(params):
            value = node.input[i] if i < len(node.input) else ""
            if not value:
                if param.option != defs.OpSchema.FormalParameterOption.Optional:
                    raise error(f"node {label} ({node.op_type}): input {param.name} is missing, expected a tensor")
                continue
            if value in consts:
                inputs[param.name], held[param.name] = numpy_helper.to_array(consts[value]), value
                checked.add(value)
            elif constant_parameters and i > 0 and value in graph_inputs:
                names = [p.name for p in params[1:]]
                raise UnsupportedOpError(
                    f"node {label} ({node.op_type}): {', '.join(names[:-1])} and {names[-1]} must be constant "
                    f"initializers, found input {param.name} = graph input '{value}' (re-export the model with "
                    "its parameters)")
            else:
                if shapes is None:
                    shapes = value_shapes(model)
                inputs[param.name] = shapes.get(value)
        given = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = attributes(node.op_type, given)
        check_node(node.op_type, attrs, inputs, node=label, error=error, initializers=held, finite=finite,
                   dtypes={"X": types.get(node.input[0])} if node.input else None)
        if node.output:
            types[node.output[0]] = "uint8" if attrs.get("output_packed") else "float32"
    if finite:
        for name, tensor in consts.items():
            if name not in checked and tensor.data_type in _FLOAT_TYPES:
                bad = nonfinite(numpy_helper.to_array(tensor), allow_inf=True)
                if bad:
                    raise error(f"initializer '{name}' {bad}, expected finite values")


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


def _declared_types(graph: onnx.GraphProto) -> dict[str, str]:
    """Element types (numpy names) of the values the graph declares (inputs, value_info, outputs)."""
    types = {}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        elem = v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else 0
        if elem:
            types[v.name] = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name
    return types


def _schema(op_type: str) -> defs.OpSchema:
    from frugalrt.export.schemas import SCHEMAS  # (schemas imports this module)

    return SCHEMAS[op_type][0]


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    consts[node.output[0]] = a.t
    return consts


def value_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Dims of every value ONNX shape inference (non-strict, rules off) or the model itself knows.

    Inference runs on a copy without value_info and output shapes (a hand-edited model's stale
    ones would conflict); where it fails, the model's declared shapes are used.
    """
    shapes: dict[str, list] = {}

    def add(values):
        for v in values:
            t = v.type.tensor_type
            if v.type.HasField("tensor_type") and t.HasField("shape"):
                shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]

    graph = model.graph
    add([*graph.input, *graph.value_info, *graph.output])
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    for out in bare.graph.output:
        out.type.tensor_type.ClearField("shape")
    try:
        with lenient():
            inferred = onnx.shape_inference.infer_shapes(bare, check_type=False, strict_mode=False)
    except Exception:  # noqa: BLE001  (inference is a help here, the declared shapes remain)
        return shapes
    add([*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output])
    return shapes


# --- shape inference of the schemas: the same rules, shapes only ------------------------------------

_STATE = threading.local()


@contextlib.contextmanager
def lenient() -> Iterator[None]:
    """Within: the schemas' shape inference propagates shapes without enforcing the rules (so that
    :func:`value_shapes` works on a model whose nodes :func:`check_model` is about to report)."""
    before = getattr(_STATE, "lenient", False)
    _STATE.lenient = True
    try:
        yield
    finally:
        _STATE.lenient = before


def is_lenient() -> bool:
    return getattr(_STATE, "lenient", False)


# --- formatting -------------------------------------------------------------------------------------

def _dims(value: Input) -> Optional[list]:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return list(value.shape)
    return [int(d) if _is_int(d) and d >= 0 else None for d in value]


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _fmt(dims) -> str:
    return "[" + ", ".join(_d(d) for d in dims) + "]"


def _d(d, unknown: str = "?") -> str:
    return unknown if d is None else str(d)


def _show(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value) if isinstance(value, str) else str(value)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
