"""Which ONNX nodes each compiled kernel comes from, recorded at compile time for ``frugalrt profile``.

The VM names a kernel call by its PrimFunc (``frugalrt_binary_gemm_vpopcnt``, ``fused_maximum_minimum``):
one PrimFunc may serve several nodes, and one fused kernel may hold several. :func:`recording`
follows the Relax ``main`` from import to the last pass that keeps it in dataflow form:

* at import, each binding of ``main`` is given the ONNX node whose output it computes, or else the
  node of its first consumer (the intermediates a converter emits, e.g. Gemm's transpose and bias);
* after each step (a TVM pass, or a rewrite between passes such as the standard-op kernels),
  a binding whose variable survives keeps its nodes; one that disappeared (fused, folded, replaced
  by a kernel) hands its nodes to what its first surviving consumer reads instead, a new variable
  (the fused call), or else to that consumer (a kernel that absorbed the chain, e.g. matmul + bias);
  ``main``'s result counts as the consumer of its outputs (a fused output is a new variable), and a
  step that rebuilt the variables of an unchanged program (BindSymbolicVars) keeps them by position.

The kernel calls of the last dataflow ``main``, in program order, are written as ``opnames.json``
beside the library: ``{"kernels": [{"kernel": symbol, "nodes": [{"name", "op_type"}]}]}``. The
VM runs them in that order, so the k-th call of a symbol in an inference is its k-th entry.
:func:`recorded` keeps that list in memory instead: the C bundle's import (its steps are the kernel
calls of its last ``main``) writes it into ``plan.json`` for the static runner.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

FILE = "opnames.json"
RESULT = -1  # the key of the pseudo binding that reads main's result (:func:`_result`)


@dataclass(frozen=True)
class _Binding:
    var: object  # the Relax variable (held, so that its handle, the key, stays unique)
    key: int
    name: str
    callee: str | None  # PrimFunc or Relax function called (call_tir or direct), else the op name
    uses: tuple[int, ...]  # keys of the variables read
    kernel: bool  # a call_tir of a PrimFunc


class _Recorder:
    """The provenance state of ``main`` (variable -> ONNX nodes), updated at each observed step."""

    def __init__(self, out: Path | None):
        self.out, self.nodes, self.converted = out, {}, []
        self.state: dict[int, frozenset] | None = None
        self.bindings: list[_Binding] = []
        self.kernels: list[dict] | None = None

    def imported(self, mod) -> None:
        """Initial state from the frontend's per-node results (:func:`_hook_frontend`)."""
        self.bindings = _bindings(mod["main"])
        outputs = {}
        for b, (var, value) in zip(self.bindings, _binding_values(mod["main"])):
            for node, expr in self.converted:
                if expr is not None and (expr.same_as(var) or expr.same_as(value)):
                    outputs[b.key] = node
        consumers, owner = _consumers(self.bindings), {}
        for b in reversed(self.bindings):
            first = next((owner[c] for c in consumers.get(b.key, []) if owner.get(c)), frozenset())
            owner[b.key] = frozenset([outputs[b.key]]) if b.key in outputs else first
        self.state = owner

    def step(self, mod) -> None:
        """Carry the state over one transformation of ``main`` (see the module docstring)."""
        if self.state is None or self.kernels is not None or "main" not in {g.name_hint for g in mod.get_global_vars()}:
            return
        if not _is_dataflow(mod["main"]):
            self.freeze()
            return
        cur = _bindings(mod["main"])
        keys = {b.key for b in cur}
        if [(b.key, b.callee, b.kernel) for b in cur] == [(b.key, b.callee, b.kernel) for b in self.bindings]:
            return
        renamed = _renaming(self.bindings, cur)
        if renamed is not None:  # the same program, variables rebuilt (e.g. BindSymbolicVars)
            self.state = {renamed[k]: v for k, v in self.state.items() if k in renamed}
            self.bindings = cur
            return
        new = {b.key: set(self.state.get(b.key, ())) for b in cur}
        consumers, before = _consumers(self.bindings), {b.key: b.uses for b in self.bindings}
        uses = {b.key: b.uses for b in cur}
        for key in set(before) - keys:
            reader = _first_surviving(key, consumers, keys)
            if reader is not None:  # the variable it reads instead, if new, computes what disappeared
                fresh = [u for u in uses[reader] if u in keys and u not in before and u not in before.get(reader, ())]
                new[fresh[0] if fresh else reader] |= self.state[key]
        self.state, self.bindings = {k: frozenset(v) for k, v in new.items()}, cur

    def safely(self, step, *args) -> None:
        """Run ``step``; if it fails, stop recording (best effort: see :func:`recording`)."""
        try:
            step(*args)
        except Exception:  # noqa: BLE001
            self.kernels = []

    def freeze(self) -> None:
        """Fix the kernel list of the last dataflow ``main`` (once); write it when recording to a folder."""
        order = list(self.nodes)
        self.kernels = [{"kernel": b.callee,
                         "nodes": [self.nodes[n] for n in sorted(self.state[b.key], key=order.index)]}
                        for b in self.bindings if b.kernel]
        if self.out is not None:
            (self.out / FILE).write_text(json.dumps({"kernels": self.kernels}, indent=1) + "\n")


@contextlib.contextmanager
def recording(out_dir: str | Path) -> Iterator[None]:
    """Record, while a model is imported and built inside, its kernels' ONNX nodes into ``out_dir``.

    Best effort: a module this cannot follow leaves no file (profile then names kernels by symbol),
    never a failed compile."""
    with _observing(_Recorder(Path(out_dir))):
        yield


@contextlib.contextmanager
def recorded() -> Iterator[list[dict]]:
    """Like :func:`recording`, but into the list it yields (filled on exit, in ``opnames.json``'s
    ``kernels`` form; empty if it could not follow), for a build that keeps the names elsewhere (the
    C bundle's ``plan.json``). Nested in a :func:`recording`, it hides the passes inside from it."""
    recorder, kernels = _Recorder(None), []
    with _observing(recorder):
        yield kernels
    kernels.extend(recorder.kernels or [])


@contextlib.contextmanager
def _observing(recorder: _Recorder) -> Iterator[None]:
    """Feed ``recorder`` the frontend's results and every pass's module inside; freeze it on exit."""
    import tvm

    @tvm.instrument.pass_instrument
    class Observer:
        def run_before_pass(self, mod, info):
            recorder.safely(recorder.step, mod)

        run_after_pass = run_before_pass

    with _hook_frontend(recorder), tvm.transform.PassContext(instruments=[Observer()]):
        yield
    if recorder.kernels is None and recorder.state is not None:
        recorder.safely(recorder.freeze)


@contextlib.contextmanager
def _hook_frontend(recorder: _Recorder) -> Iterator[None]:
    """Note the result of each node the ONNX frontend converts (node name from its ``tvm_custom``),
    then the module it returns."""
    from tvm.relax.frontend.onnx import onnx_frontend

    importer = onnx_frontend.ONNXGraphImporter
    original, original_import = importer._convert_operator, onnx_frontend.from_onnx

    def convert(self, op_name, inputs, attrs, opset):
        result = original(self, op_name, inputs, attrs, opset)
        name = attrs.get("tvm_custom", {}).get("name") or f"{op_name}_{len(recorder.converted)}"
        recorder.nodes[name] = {"name": name, "op_type": _op_type(op_name)}
        recorder.converted.append((name, result))
        return result

    def from_onnx(*args, **kwargs):
        mod = original_import(*args, **kwargs)
        if recorder.state is None and recorder.kernels is None:
            recorder.safely(recorder.imported, mod)
        return mod

    importer._convert_operator, onnx_frontend.from_onnx = convert, from_onnx
    try:
        yield
    finally:
        importer._convert_operator, onnx_frontend.from_onnx = original, original_import


def _op_type(op_name: str) -> str:
    """The ONNX op type of a (possibly renamed, ``ai.frugalrt::Butterfly@v1``) frontend op name."""
    return op_name.split("::")[-1].split("@")[0]


def _is_dataflow(func) -> bool:
    from tvm import relax

    return isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr) and \
        any(isinstance(block, relax.DataflowBlock) for block in func.body.blocks)


def _binding_values(func):
    from tvm import relax

    for block in func.body.blocks if isinstance(func.body, relax.SeqExpr) else []:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                yield b.var, b.value


def _bindings(func) -> list[_Binding]:
    import tvm
    from tvm import relax

    out = []
    for var, value in _binding_values(func):
        uses: list[int] = []
        relax.analysis.post_order_visit(value, lambda e: uses.append(hash(e)) if isinstance(e, relax.Var) else None)
        callee, kernel, op = None, False, getattr(value, "op", None)
        if isinstance(op, tvm.ir.Op) and op.name == "relax.call_tir" and isinstance(value.args[0], relax.GlobalVar):
            callee, kernel = value.args[0].name_hint, True
        elif op is not None:
            callee = op.name_hint if isinstance(op, relax.GlobalVar) else getattr(op, "name", None)
        out.append(_Binding(var, hash(var), str(var.name), callee, tuple(uses), kernel))
    return out + [_result(func)]


def _result(func) -> _Binding:
    """A pseudo binding that reads what ``main`` returns: the consumer of its outputs, so that what a
    fused output computed passes to the new output variable (FuseOps replaces it)."""
    from tvm import relax

    uses: list[int] = []
    body = func.body.body if isinstance(func.body, relax.SeqExpr) else func.body
    relax.analysis.post_order_visit(body, lambda e: uses.append(hash(e)) if isinstance(e, relax.Var) else None)
    return _Binding(None, RESULT, "<result>", None, tuple(uses), False)


def _renaming(old: list[_Binding], new: list[_Binding]) -> dict[int, int] | None:
    """old key -> new key when ``new`` is ``old`` with variables rebuilt (e.g. those whose type held the
    batch): the same calls in the same order, each reading the same earlier bindings, and every
    surviving variable in its place; else None."""
    if [(b.callee, b.kernel) for b in old] != [(b.callee, b.kernel) for b in new]:
        return None
    renamed, kept = {a.key: b.key for a, b in zip(old, new)}, {b.key for b in new}
    if any(a != b and a in kept for a, b in renamed.items()):
        return None

    def reads(bindings: list[_Binding]) -> list[tuple[int, ...]]:
        index = {b.key: i for i, b in enumerate(bindings)}
        return [tuple(index[u] for u in b.uses if u in index) for b in bindings]

    return renamed if reads(old) == reads(new) else None


def _consumers(bindings: list[_Binding]) -> dict[int, list[int]]:
    """variable key -> the keys of the bindings that read it, in program order."""
    consumers: dict[int, list[int]] = {}
    for b in bindings:
        for u in dict.fromkeys(b.uses):
            consumers.setdefault(u, []).append(b.key)
    return consumers


def _first_surviving(var: int, consumers: dict[int, list[int]], alive: set[int]) -> int | None:
    """The first binding downstream of ``var`` (breadth-first, program order) still in ``alive``."""
    queue, seen = list(consumers.get(var, [])), set()
    while queue:
        v = queue.pop(0)
        if v in alive:
            return v
        if v not in seen:
            seen.add(v)
            queue += consumers.get(v, [])
    return None


def load(artifact_dir: str | Path) -> list[dict] | None:
    """The recorded kernel list of an artifact, or None (compiled before it was recorded)."""
    path = Path(artifact_dir) / FILE
    try:
        return json.loads(path.read_text())["kernels"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
