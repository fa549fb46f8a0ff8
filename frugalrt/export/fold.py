"""ONNX graph rewrites that fold constants into the neighbouring op (shared by export and compile).

The ``ai.frugalrt`` ops are opaque kernels once imported into TVM, so their neighbours are folded
into them here, on the ONNX graph, where every consumer (ONNX Runtime, TVM, the C bundle) sees it:

* :func:`fold_affine`: a BatchNormalization in inference mode, or a ``Mul``/``Add``/``Sub`` by a
  per-channel constant, right after a ``BinaryGemm``/``BinaryConv`` (into ``scale`` and ``B``),
  a ``Butterfly`` (into the last stage's twiddle rows and ``B``), or a standard ``Gemm``,
  ``MatMul`` or ``Conv`` with constant weights (into the weights and bias). The affine map
  ``y -> a * y + b`` per output channel becomes ``scale' = scale * a``, ``B' = B * a + b``
  (``B`` = 0 when absent), computed in float64 and rounded once to float32. The result equals
  the unfolded graph up to float32 rounding (a few ulps of the output), not bit for bit.
* :func:`remove_identity_reshapes`: a ``Reshape`` to ``[-1 or 0, d1, ...]`` of a tensor whose
  dims after the first already are ``d1, ...`` (the exporter's ``view`` before each layer).
* :func:`drop_clips_before_binary`: a ``Clip`` with ``min < 0 <= max`` (``Hardtanh``) whose only
  consumers binarize it (the ``X`` of ``BinaryGemm``/``BinaryConv``): it never changes a sign, so
  ``sign(clip(x)) == sign(x)`` exactly (docs/ops.md). (Not ``LeakyRelu``: ``alpha * x`` can
  underflow to -0.0, whose sign is +1.)

* :func:`fuse_activations`: a ``Relu``, or a ``Clip`` with constant bounds, right after an
  ``ai.frugalrt`` op becomes the op's ``activation`` attribute (its output transform applies it:
  bit-identical, docs/ops.md).
* :func:`pack_between_binary` (where the caller asks: the exporter, and the importer for targets
  whose binary kernels take packed activations): a ``BinaryGemm``/``BinaryConv`` whose output is
  read only as the ``X`` of other binary ops emits its packed sign bits (``output_packed``) and
  they read them (``input_packed``): bit-identical, since they binarize it anyway (docs/ops.md).
  :func:`unpack_between_binary` undoes it for the other targets.

A fold happens only when it is exact in real arithmetic: the folded-away value has no other
consumer and is no graph output, the constants are float32 initializers (or ``Constant`` nodes)
that broadcast along the channel axis only, and the folded values are finite. Anything else is
left as it was. :func:`optimize_graph` runs them in order (what ``frugalrt.compile`` does);
``frugalrt.export(..., fold_bn=True)`` runs :func:`fold_affine`, and ``pack_activations=True`` the
identity reshapes, :func:`drop_clips_before_binary` and :func:`pack_between_binary`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from frugalrt.runtime.reference import DOMAIN

STANDARD = ("", "ai.onnx")
BINARY_OPS = ("BinaryGemm", "BinaryConv")


@dataclass
class FoldStats:
    """What :func:`optimize_graph` removed: node counts by rewrite."""
    reshapes: int = 0
    affine: dict[str, int] = field(default_factory=dict)  # folded op type -> count
    clips: int = 0
    activations: int = 0
    packed: int = 0  # binary ops that now emit packed sign bits (no node removed)
    unpacked: int = 0  # binary ops that no longer do (a packed file, a target without packed kernels)

    @property
    def total(self) -> int:
        return self.reshapes + sum(self.affine.values()) + self.clips + self.activations


def optimize_graph(model: onnx.ModelProto, pack_bits: bool = False) -> FoldStats:
    """Identity reshapes, then affine folding, then sign-preserving clips before binary ops, then
    activations into the ops, then packed sign bits between binary ops where ``pack_bits`` (the
    target's binary kernels take them), float activations there otherwise (in place)."""
    stats = FoldStats()
    stats.reshapes = remove_identity_reshapes(model)
    stats.affine = fold_affine(model)
    stats.clips = drop_clips_before_binary(model)
    stats.activations = fuse_activations(model)
    if pack_bits:
        stats.packed = pack_between_binary(model)
    else:
        stats.unpacked = unpack_between_binary(model)
    return stats


# --- graph bookkeeping ------------------------------------------------------------------------------

class _Graph:
    """Producers, consumers and constants of ``model.graph``, rebuilt after every rewrite."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, list] | None = None):
        self.model, self.graph = model, model.graph
        self.shapes = shapes
        self.inits = {t.name: t for t in self.graph.initializer}
        self.const_nodes = {n.output[0]: n for n in self.graph.node
                            if n.op_type == "Constant" and n.domain in STANDARD and n.output}
        self.outputs = {v.name for v in self.graph.output}
        self.producer, self.consumers = {}, {}
        for node in self.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.const_nodes.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    return numpy_helper.to_array(a.t)
        return None

    def only_consumer(self, name: str, node: onnx.NodeProto) -> bool:
        """``node`` is the one consumer of ``name`` (listed once) and ``name`` is no graph output."""
        users = self.consumers.get(name, [])
        return name not in self.outputs and len(users) == 1 and users[0] == node \
            and list(node.input).count(name) == 1

    def add_const(self, base: str, value: np.ndarray) -> str:
        taken = set(self.inits) | set(self.producer) | {v.name for v in self.graph.input}
        name, i = f"{base}_folded", 1
        while name in taken:
            name, i = f"{base}_folded{i}", i + 1
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def remove_node(self, node: onnx.NodeProto) -> None:
        for i, n in enumerate(self.graph.node):
            if n == node:  # by value: outputs are unique
                del self.graph.node[i]
                return

    def drop_value_info(self, name: str) -> None:
        for i, v in enumerate(self.graph.value_info):
            if v.name == name:
                del self.graph.value_info[i]
                return

    def rank(self, name: str) -> int | None:
        if self.shapes is None:
            from frugalrt.export.spec_check import value_shapes

            self.shapes = value_shapes(self.model)
        dims = self.shapes.get(name)
        return None if dims is None else len(dims)


def _remove(g: _Graph, node: onnx.NodeProto, value: str, consts: set[str]) -> None:
    """Remove ``node`` and the value info of ``value`` (no longer computed); its constant inputs
    join ``consts``, the candidates for :func:`_prune_constants`."""
    g.remove_node(node)
    g.drop_value_info(value)
    consts.update(node.input[1:])


def _prune_constants(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove the initializers / Constant nodes in ``candidates`` that nothing reads any more."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    dead = candidates - used
    if not dead:
        return
    keep = [t for t in graph.initializer if t.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    keep_inputs = [v for v in graph.input if v.name not in dead]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    keep_nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output and n.output[0] in dead)]
    del graph.node[:]
    graph.node.extend(keep_nodes)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _is_binary(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type in BINARY_OPS


def _reads_as_x(user: onnx.NodeProto, name: str) -> bool:
    """``user`` is a binary op that reads ``name`` as its X only (so it binarizes it)."""
    return _is_binary(user) and user.input[0] == name and list(user.input).count(name) == 1


def _is_float32(*arrays) -> bool:
    return all(a is not None and a.dtype == np.float32 for a in arrays)


# --- identity reshapes ------------------------------------------------------------------------------

def remove_identity_reshapes(model: onnx.ModelProto) -> int:
    """Bypass each ``Reshape`` that keeps its input's shape (see the module docstring); the count."""
    g = _Graph(model)
    removed, consts = 0, set()
    for node in list(model.graph.node):
        if node.op_type != "Reshape" or node.domain not in STANDARD or len(node.input) != 2:
            continue
        data, out = node.input[0], node.output[0]
        target = g.const(node.input[1])
        dims = g.shapes.get(data) if g.rank(data) is not None else None
        if target is None or dims is None or out in g.outputs or target.ndim != 1 or len(target) != len(dims):
            continue
        allowzero = int(_attr(node, "allowzero", 0))
        first = int(target[0]) if len(target) else None
        if not len(target) or not (first in (-1, dims[0]) or (first == 0 and not allowzero)):
            continue
        keeps = lambda t, d: d is not None and (int(t) == d or (int(t) == 0 and not allowzero))  # noqa: E731
        if all(keeps(t, d) for t, d in zip(target[1:], dims[1:])):
            for user in g.consumers.get(out, []):
                for i, name in enumerate(user.input):
                    if name == out:
                        user.input[i] = data
            g.remove_node(node)
            g.drop_value_info(out)
            consts.add(node.input[1])
            removed += 1
    _prune_constants(model, consts)
    return removed


# --- affine folding ---------------------------------------------------------------------------------

def _affine_of(g: _Graph, node: onnx.NodeProto, y: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(a, b)`` (float64, broadcastable to ``[1, C, 1...]``) if ``node`` computes ``a * y + b``."""
    if node.domain not in STANDARD:
        return None
    if node.op_type == "BatchNormalization":
        if _attr(node, "training_mode", 0) or any(node.output[1:]) or len(node.input) != 5 or node.input[0] != y:
            return None
        gamma, beta, mean, var = (g.const(n) for n in node.input[1:])
        if not _is_float32(gamma, beta, mean, var) or gamma.ndim != 1:
            return None
        eps = float(_attr(node, "epsilon", 1e-5))
        a = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        return a, beta.astype(np.float64) - mean.astype(np.float64) * a
    if node.op_type not in ("Mul", "Add", "Sub") or len(node.input) != 2 or y not in node.input:
        return None
    other = node.input[1] if node.input[0] == y else node.input[0]
    c = g.const(other)
    if not _is_float32(c):
        return None
    c = c.astype(np.float64)
    if node.op_type == "Mul":
        return c, np.zeros_like(c)
    if node.op_type == "Add":
        return np.ones_like(c), c
    return (np.ones_like(c), -c) if node.input[0] == y else (-np.ones_like(c), c)


def _per_channel(value: np.ndarray, rank: int, channels: int, batchnorm: bool) -> np.ndarray | None:
    """``value`` as ``[channels]`` if it broadcasts against a ``[batch, channels, ...]`` tensor of
    ``rank`` along the channel axis only (BatchNormalization's parameters are per channel already)."""
    if batchnorm:
        return value if value.shape == (channels,) else None
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)


def _channel_scale(array: np.ndarray, a: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * array.ndim
    shape[axis] = len(a)
    return array.astype(np.float64) * a.reshape(shape)


def _fold_into(g: _Graph, p: onnx.NodeProto, a: np.ndarray, b: np.ndarray, dead: set[str]) -> bool:
    """Rewrite producer ``p`` so that it outputs ``a * p(x) + b`` (per channel); False (and ``p``
    untouched) if it cannot."""
    scale_needed, shift_needed = not np.all(a == 1), bool(np.any(b != 0))
    new: dict[int, tuple[str, np.ndarray]] = {}  # input index -> (name base, new value)
    attrs: dict[str, float] = {}
    op_type = p.op_type

    def bias_input(index: int, bias: np.ndarray | None, base: np.ndarray | None = None):
        if bias is None and base is None and not shift_needed:
            return
        if base is None:
            base = np.zeros(len(a)) if bias is None else bias.astype(np.float64).reshape(-1)
        name = p.input[index] if len(p.input) > index and p.input[index] else f"{p.output[0]}_bias"
        new[index] = (name, base * a + b)

    def optional(index: int):
        return g.const(p.input[index]) if len(p.input) > index and p.input[index] else None

    def bad_optional(index: int, value) -> bool:  # present but not a float32 constant
        return len(p.input) > index and bool(p.input[index]) and not _is_float32(value)

    op = (p.domain if p.domain not in STANDARD else "", p.op_type)
    if op in ((DOMAIN, "BinaryGemm"), (DOMAIN, "BinaryConv")):
        scale, bias = optional(2), optional(3)
        if not _is_float32(scale) or bad_optional(3, bias):
            return False
        if scale_needed:
            new[2] = (p.input[2], scale.astype(np.float64) * a)
        bias_input(3, bias)
    elif op == (DOMAIN, "Butterfly"):
        tw, bias = optional(1), optional(2)
        if not _is_float32(tw) or tw.ndim != 4 or bad_optional(2, bias):
            return False
        if scale_needed:
            if tw.shape[0] == 0:
                return False
            half = tw.shape[1]
            full = np.ones(2 * half)
            full[:len(a)] = a  # the last stage (stride N/2) writes y[p] from row 0, y[p + N/2] from row 1
            tw = tw.astype(np.float64)
            tw[-1, :, 0, :] *= full[:half, None]
            tw[-1, :, 1, :] *= full[half:, None]
            new[1] = (p.input[1], tw)
        bias_input(2, bias)
    elif op == ("", "Conv"):
        w, bias = optional(1), optional(2)
        if not _is_float32(w) or bad_optional(2, bias):
            return False
        if scale_needed:
            new[1] = (p.input[1], _channel_scale(w, a, 0))
        bias_input(2, bias)
    elif op == ("", "Gemm"):
        w, c = optional(1), optional(2)
        alpha, beta = float(_attr(p, "alpha", 1.0)), float(_attr(p, "beta", 1.0))
        cc = None if c is None else _per_channel(c.astype(np.float64) * beta, 2, len(a), False)
        if not _is_float32(w) or w.ndim != 2 or _attr(p, "transA", 0) or bad_optional(2, c) or \
                (c is not None and cc is None):
            return False
        if scale_needed or alpha != 1.0:
            new[1] = (p.input[1], _channel_scale(w.astype(np.float64) * alpha, a, 0 if _attr(p, "transB", 0) else 1))
            attrs["alpha"] = 1.0
        if c is not None or shift_needed:
            bias_input(2, c, cc)
            attrs["beta"] = 1.0
    elif op == ("", "MatMul"):
        w = optional(1)
        if not _is_float32(w) or w.ndim != 2 or g.rank(p.input[0]) != 2:
            return False
        if scale_needed:
            new[1] = (p.input[1], _channel_scale(w, a, 1))
        if shift_needed:  # MatMul has no bias: it becomes Gemm(A, W', b)
            op_type = "Gemm"
            bias_input(2, None)
    else:
        return False
    values = {i: v.astype(np.float32) for i, (_, v) in new.items()}
    if any(not np.all(np.isfinite(v)) for v in values.values()):
        return False
    p.op_type = op_type
    for name, value in attrs.items():
        _set_attr(p, name, value)
    for i, (base, _) in new.items():
        while len(p.input) <= i:
            p.input.append("")
        if p.input[i]:
            dead.add(p.input[i])
        p.input[i] = g.add_const(base, values[i])
    return True


def _channels(g: _Graph, p: onnx.NodeProto) -> tuple[int, int] | None:
    """(rank of ``p``'s output, channel count) for the producers :func:`_fold_into` handles."""
    op = (p.domain if p.domain not in STANDARD else "", p.op_type)
    if op == (DOMAIN, "BinaryGemm"):
        scale = g.const(p.input[2]) if len(p.input) > 2 else None
        return None if scale is None else (2, scale.size)
    if op == (DOMAIN, "BinaryConv"):
        scale = g.const(p.input[2]) if len(p.input) > 2 else None
        return None if scale is None else (4, scale.size)
    if op == (DOMAIN, "Butterfly"):
        out = _attr(p, "out_features")
        return None if out is None else (2, int(out))
    w = g.const(p.input[1]) if len(p.input) > 1 else None
    if w is None:
        return None
    if op == ("", "Conv"):
        return w.ndim, w.shape[0]
    if op == ("", "Gemm") and w.ndim == 2:
        return 2, w.shape[0] if _attr(p, "transB", 0) else w.shape[1]
    if op == ("", "MatMul") and w.ndim == 2:
        return 2, w.shape[1]
    return None


def fold_affine(model: onnx.ModelProto) -> dict[str, int]:
    """Fold per-channel affine nodes into their producers, in place; ``{op_type: count}`` folded."""
    folded: dict[str, int] = {}
    dead: set[str] = set()
    shapes = None
    changed = True
    while changed:
        changed = False
        g = _Graph(model, shapes)
        for node in list(model.graph.node):
            if node.domain not in STANDARD or node.op_type not in ("BatchNormalization", "Mul", "Add", "Sub"):
                continue
            for y in node.input[:1] if node.op_type == "BatchNormalization" else node.input:
                p = g.producer.get(y)
                if p is None or not g.only_consumer(y, node) or len(p.output) != 1:
                    continue
                where = _channels(g, p)
                with np.errstate(all="ignore"):  # a non-finite result is refused below, not warned about
                    affine = _affine_of(g, node, y)
                    if where is None or affine is None:
                        continue
                    rank, channels = where
                    bn = node.op_type == "BatchNormalization"
                    a, b = (_per_channel(v, rank, channels, bn) for v in affine)
                    if a is None or b is None or not _fold_into(g, p, a, b, dead):
                        continue
                dead.update(node.input[1:] if bn else [n for n in node.input if n != y])
                p.output[0] = node.output[0]
                g.remove_node(node)
                g.drop_value_info(y)
                folded[node.op_type] = folded.get(node.op_type, 0) + 1
                changed = True
                break
            if changed:
                shapes = g.shapes
                break
    _prune_constants(model, dead)
    return folded


# --- clips before binarization -----------------------------------------------------------------------

def _clip_bounds(g: _Graph, node: onnx.NodeProto) -> tuple[float, float] | None:
    """(min, max) of a standard ``Clip`` with constant scalar bounds (absent: -inf, inf), else None."""
    if node.domain not in STANDARD or node.op_type != "Clip":
        return None
    lo, hi = _attr(node, "min"), _attr(node, "max")  # opset < 11: attributes
    if len(node.input) > 1 and node.input[1]:
        lo = g.const(node.input[1])
        if lo is None or lo.size != 1:
            return None
    if len(node.input) > 2 and node.input[2]:
        hi = g.const(node.input[2])
        if hi is None or hi.size != 1:
            return None
    lo = -np.inf if lo is None else float(np.asarray(lo).reshape(-1)[0])
    hi = np.inf if hi is None else float(np.asarray(hi).reshape(-1)[0])
    return lo, hi


def _keeps_sign(g: _Graph, node: onnx.NodeProto) -> bool:
    """A Clip with min < 0 <= max: x >= 0 stays >= 0 and x < 0 stays < 0 (clip(-0.0) is -0.0, +1)."""
    bounds = _clip_bounds(g, node)
    return bounds is not None and bounds[0] < 0 <= bounds[1]


def drop_clips_before_binary(model: onnx.ModelProto) -> int:
    """Bypass sign-preserving Clip nodes read only as the X of binary ops; the count."""
    g = _Graph(model)
    dropped, consts = 0, set()
    for node in list(model.graph.node):
        if len(node.output) != 1 or not _keeps_sign(g, node):
            continue
        out, x = node.output[0], node.input[0]
        users = g.consumers.get(out, [])
        if out in g.outputs or not users or not all(_reads_as_x(u, out) for u in users):
            continue
        for user in users:
            user.input[0] = x
        _remove(g, node, out, consts)
        dropped += 1
    _prune_constants(model, {c for c in consts if c})
    return dropped


# --- activations into the ops' output transform -----------------------------------------------------

def _activation_of(g: _Graph, node: onnx.NodeProto) -> dict | None:
    """The ``activation`` attributes (docs/ops.md) that compute ``node``: Relu, or Clip with constant
    bounds min <= max; None for anything else."""
    if node.domain in STANDARD and node.op_type == "Relu":
        return {"activation": "relu"}
    bounds = _clip_bounds(g, node)
    if bounds is None or not bounds[0] <= bounds[1]:
        return None
    return {"activation": "clip", "activation_min": bounds[0], "activation_max": bounds[1]}


def fuse_activations(model: onnx.ModelProto) -> int:
    """Make each Relu / constant-bound Clip whose input is read by it alone and comes from an
    ``ai.frugalrt`` node without an activation that node's ``activation``; the count. Exact: the op
    applies the same ONNX function to the same float32 values (docs/ops.md, "Fused activation")."""
    g = _Graph(model)
    fused, consts = 0, set()
    for node in list(model.graph.node):
        if len(node.output) != 1 or not node.input:
            continue
        x = node.input[0]
        producer = g.producer.get(x)
        if producer is None or producer.domain != DOMAIN or _attr(producer, "activation", b"") not in (b"", "") \
                or not g.only_consumer(x, node):
            continue
        attrs = _activation_of(g, node)
        if attrs is None:
            continue
        for name, value in attrs.items():
            _set_attr(producer, name, value)
        producer.output[0] = node.output[0]
        _remove(g, node, x, consts)
        fused += 1
    _prune_constants(model, {c for c in consts if c})
    return fused


# --- packed activations between binary ops ---------------------------------------------------------

def _pack_value_info(g: _Graph, node: onnx.NodeProto) -> None:
    """The declared type of ``node``'s output, if any, as its packed form: uint8, channels packed
    last (docs/ops.md: Y [batch, ceil(N/8)] or [batch, OH, OW, ceil(O/8)])."""
    for v in g.graph.value_info:
        if v.name != node.output[0] or not v.type.HasField("tensor_type"):
            continue
        t = v.type.tensor_type
        t.elem_type = onnx.TensorProto.UINT8
        if not t.HasField("shape") or len(t.shape.dim) != (2 if node.op_type == "BinaryGemm" else 4):
            t.ClearField("shape")
            continue
        dims = [onnx.TensorShapeProto.Dimension() for _ in t.shape.dim]
        for new, old in zip(dims, [t.shape.dim[0], *t.shape.dim[2:], t.shape.dim[1]]):
            new.CopyFrom(old)
        channels = dims[-1]
        if channels.HasField("dim_value"):
            channels.dim_value = (channels.dim_value + 7) // 8
        else:
            channels.Clear()
        del t.shape.dim[:]
        t.shape.dim.extend(dims)


def pack_between_binary(model: onnx.ModelProto) -> int:
    """Make each ``BinaryGemm``/``BinaryConv`` whose output is read only as the ``X`` of other binary
    ops (and is no graph output) emit its packed sign bits, which those ops then read (in place);
    the count. Bit-identical: a consumer binarizes X anyway, and the bits are those of the float
    result, activation included (docs/ops.md, "Packed activations")."""
    g = _Graph(model)
    packed = 0
    for node in model.graph.node:
        if not _is_binary(node) or len(node.output) != 1 or _attr(node, "output_packed", 0):
            continue
        y = node.output[0]
        users = g.consumers.get(y, [])
        if y in g.outputs or not users or not all(_reads_as_x(u, y) for u in users):
            continue
        _set_attr(node, "output_packed", 1)
        for user in users:
            _set_attr(user, "input_packed", 1)
        _pack_value_info(g, node)
        packed += 1
    return packed


def unpack_between_binary(model: onnx.ModelProto) -> int:
    """Undo :func:`pack_between_binary` where a packed output is read only by binary ops (for
    targets whose kernels want float activations); the count. Exact for the same reason."""
    g = _Graph(model)
    unpacked = 0
    for node in model.graph.node:
        if not _is_binary(node) or not _attr(node, "output_packed", 0):
            continue
        y = node.output[0]
        users = g.consumers.get(y, [])
        if y in g.outputs or not all(_reads_as_x(u, y) for u in users):
            continue
        for n in (node, *users):
            name = "output_packed" if n is node else "input_packed"
            n.attribute.remove(next(a for a in n.attribute if a.name == name))
        g.drop_value_info(y)  # shape inference gives it again, float32 NCHW
        unpacked += 1
    return unpacked

