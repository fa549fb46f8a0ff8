"""Relax module -> a straight-line program: kernel calls over named tensors, no VM.

The dynamic batch is specialized to 1 (a batch of N is N calls of ``model_run``). Standard ops are
legalized to TIR and fused; what remains in ``main`` must be ``call_tir`` bindings (plus aliases and
tuples), which become one C call each. Constants become flash data, exactly as the lowering left
them (binary weights stay bit-packed).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from frugalrt.errors import UnsupportedOpError

KERNEL_PREFIX = "frt_"


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # "input" | "output" | "const" | "arena"
    index: int = 0  # position among the inputs / outputs / constants

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class Step:
    kernel: str  # TVM global symbol of the PrimFunc
    args: list[str]  # tensor names, inputs then outputs (destination-passing style)
    outputs: list[str]
    nodes: list[dict] = field(default_factory=list)  # the ONNX nodes it computes ({"name", "op_type"}), if known


@dataclass
class Program:
    inputs: list[str]
    outputs: list[str]
    tensors: dict[str, TensorInfo]
    steps: list[Step]
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    kernels: object = None  # tvm.IRModule of the PrimFuncs, named with their global symbols


def _specialize_batch(mod):
    """Bind every symbolic dimension of main's signature (the dynamic batch) to 1."""
    from tvm import relax, tirx

    names = set()
    for param in mod["main"].params:
        for dim in getattr(param.ty, "shape", None) or []:
            if isinstance(dim, tirx.Var):
                names.add(dim.name)
    if names:  # the kernels too, so that fusion sees static buffers on both sides
        mod = relax.transform.BindSymbolicVars({n: 1 for n in names})(mod)
    return relax.transform.SpecializePrimFuncBasedOnCallSite()(mod)


def _lower(mod):
    import tvm
    from tvm import relax

    seq = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(), relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
        relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination(["main"]),
    ])
    return seq(_specialize_batch(mod))


def _tensor_type(ty, where: str) -> tuple[tuple[int, ...], str]:
    shape = getattr(ty, "shape", None)
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise UnsupportedOpError(f"C bundle: {where} has a non-static shape {shape} after specializing "
                                 "the batch to 1; the bundle needs fully static shapes") from None
    return dims, str(ty.dtype)


def extract_program(mod) -> Program:
    """Legalize, fuse and walk ``main`` into a :class:`Program`."""
    import tvm
    from tvm import ir, tirx

    mod = _lower(mod)
    main = mod["main"]
    tensors: dict[str, TensorInfo] = {}
    env: dict = {}  # relax var -> tensor name, or list of names for a tuple
    const_ids: dict = {}  # relax constant -> tensor name
    consts: dict[str, np.ndarray] = {}

    def new_tensor(ty, kind: str, where: str, prefix: str = "t") -> str:
        shape, dtype = _tensor_type(ty, where)
        name = f"{prefix}{len(tensors)}"
        tensors[name] = TensorInfo(name, shape, dtype, kind)
        return name

    def resolve(expr, where: str):
        if isinstance(expr, ir.expr.GenericConst):
            if expr not in const_ids:
                value = expr.value.numpy()
                name = f"w{len(consts)}"
                tensors[name] = TensorInfo(name, tuple(value.shape), str(value.dtype), "const", len(consts))
                consts[name] = np.ascontiguousarray(value)
                const_ids[expr] = name
            return const_ids[expr]
        if isinstance(expr, ir.expr.Tuple):
            return [resolve(f, where) for f in expr.fields]
        if expr in env:
            return env[expr]
        raise UnsupportedOpError(f"C bundle: cannot place {type(expr).__name__} {expr} in {where}")

    inputs = []
    for i, param in enumerate(main.params):
        name = new_tensor(param.ty, "input", f"input #{i}", prefix="in")
        tensors[name].index = i
        env[param] = name
        inputs.append(name)

    steps: list[Step] = []
    call_tir = tvm.ir.Op.get("relax.call_tir")
    for block in main.body.blocks:
        for binding in block.bindings:
            value, var = binding.value, binding.var
            where = f"binding {getattr(var, 'name', var)}"
            if isinstance(value, ir.expr.Call) and value.op.same_as(call_tir):
                if len(value.args) > 2:
                    raise UnsupportedOpError(f"C bundle: {where} passes symbolic shape arguments to "
                                             f"{value.args[0].name_hint}; shapes must be static")
                args = resolve(value.args[1], where)
                out_ty = value.ty_args[0]
                outs = ([new_tensor(t, "arena", where) for t in out_ty.fields]
                        if hasattr(out_ty, "fields") else [new_tensor(out_ty, "arena", where)])
                steps.append(Step(KERNEL_PREFIX + value.args[0].name_hint, list(args) + outs, outs))
                env[var] = outs if hasattr(out_ty, "fields") else outs[0]
            elif isinstance(value, ir.expr.TupleGetItem):
                env[var] = resolve(value.tuple_value, where)[value.index]
            elif isinstance(value, (ir.expr.Tuple, ir.expr.GenericConst)) or value in env:
                env[var] = resolve(value, where)
            else:
                op = getattr(getattr(value, "op", None), "name", type(value).__name__)
                raise UnsupportedOpError(f"C bundle: {where} is {op}, which has no TIR kernel after "
                                         "legalization; only call_tir bindings can run without the TVM VM")
    result = resolve(main.body.body, "the model output")
    outputs = result if isinstance(result, list) else [result]
    for i, name in enumerate(outputs):
        info = tensors[name]
        if info.kind != "arena" or outputs.count(name) > 1:
            raise UnsupportedOpError(f"C bundle: output #{i} ({name}, a {info.kind}) is not computed by a "
                                     "kernel of its own; the bundle writes outputs straight from kernels")
        info.kind, info.index = "output", i

    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            symbol = KERNEL_PREFIX + gv.name_hint
            funcs[symbol] = func.with_attr("global_symbol", symbol)
    return Program(inputs, outputs, tensors, steps, consts, tvm.IRModule(funcs))


_WORKSPACE = re.compile(r"TVMBackendAllocWorkspace\(\s*\d+\s*,[^,]+,\s*\(uint64_t\)\s*(\d+)")
_FUNC = re.compile(r"^TVM_DLL int32_t (\w+)\(void\* self_handle", re.M)


def compile_kernels(program: Program, target) -> tuple[str, int]:
    """TVM C codegen of the program's PrimFuncs -> (C source, workspace bytes it may request).

    Argument checks are compiled out (``tirx.disable_assert``): the driver always passes exactly
    the shapes the kernels were built for, and the checks' strings would cost flash. A kernel
    frees its workspace in LIFO order, so the sum of one kernel's requests bounds the arena.
    """
    import tvm

    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
        lib = tvm.compile(program.kernels, target=target)
    source = lib.mod.inspect_source()
    worst = 0
    bodies = _FUNC.split(source)
    for body in bodies[2::2]:
        worst = max(worst, sum((int(n) + 15) // 16 * 16 for n in _WORKSPACE.findall(body)))
    return source, worst
