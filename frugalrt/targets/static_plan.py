"""The static plan of a compiled model: ``main`` as a straight line of kernel calls, for callers
that skip the Relax VM (``frugalrt.runtime.plan``).

After the graph passes, ``main`` of most models is a chain of ``call_tir`` bindings whose shapes
depend on the batch only. The VM interprets that chain with about six builtin calls per kernel
(shapes, storage, tensors, frees): on a small model they cost more than the kernels themselves.
The plan lists the same calls over numbered tensors (shapes as expressions of the batch), so a
caller allocates every tensor once per batch and then only calls the kernels, in order, with the
same arguments as the VM: the results are the VM's, bit for bit.

The constants stay where they are, in the VM executable: :func:`attach` adds a Relax function
``frugalrt_constants`` that returns them as a tuple (the VM's constant pool holds each once).
:func:`driver_source` writes the plan as C (``frugalrt_plan_bind`` / ``_run`` / ``_free``, TVM FFI
packed functions calling the kernels' symbols directly), which ``compile`` links into ``lib.so``
(cross-compiled with the target's toolchain), so one call runs the whole model.
A ``main`` that is not such a chain (control flow, a ``call_tir`` with symbolic arguments, tuple
results of a kernel, more than one symbolic dimension) gets no plan and runs on the VM.
"""
from __future__ import annotations

from typing import Any

import tvm
from tvm import relax, tirx

CONSTANTS_FUNCTION = "frugalrt_constants"
PLAN_VERSION = 1
_OPS = {tirx.Add: "+", tirx.Sub: "-", tirx.Mul: "*", tirx.FloorDiv: "//", tirx.FloorMod: "%",
        tirx.Max: "max", tirx.Min: "min"}


class NoPlan(Exception):
    """``main`` is not a straight line of kernel calls (the message says what is not)."""


def _dim(expr, batch: tirx.Var | None) -> Any:
    """A shape dimension as JSON: an int, ``"batch"``, or ``[op, a, b]`` with op in ``_OPS``."""
    if isinstance(expr, tirx.IntImm):
        return int(expr)
    if batch is not None and isinstance(expr, tirx.Var) and expr.same_as(batch):
        return "batch"
    op = _OPS.get(type(expr))
    if op is None:
        raise NoPlan(f"shape dimension {expr} is not an expression of the batch")
    return [op, _dim(expr.a, batch), _dim(expr.b, batch)]


class _Extractor:
    def __init__(self, main: relax.Function, batch: tirx.Var | None):
        self.batch = batch
        self.refs: dict[Any, list] = {p: ["input", i] for i, p in enumerate(main.params)}
        self.tuples: dict[Any, list[list]] = {}
        self.consts: list = []
        self.tensors: list[dict] = []
        self.steps: list[dict] = []

    def tensor_of(self, ty) -> list:
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            raise NoPlan(f"kernel result of type {ty} is not one tensor of known shape")
        self.tensors.append({"shape": [_dim(d, self.batch) for d in ty.shape.values], "dtype": str(ty.dtype)})
        return ["tensor", len(self.tensors) - 1]

    def ref(self, expr) -> list:
        if isinstance(expr, tvm.ir.expr.Constant):
            for i, known in enumerate(self.consts):
                if known.same_as(expr):
                    return ["const", i]
            self.consts.append(expr)
            return ["const", len(self.consts) - 1]
        if expr in self.refs:
            return self.refs[expr]
        raise NoPlan(f"argument {type(expr).__name__} is neither a constant nor a tensor of the plan")

    def binding(self, var, value) -> None:
        if isinstance(value, relax.Var):  # an alias
            self.refs[var] = self.ref(value)
            return
        if isinstance(value, relax.Tuple):  # grouping results (main's tuple output)
            self.tuples[var] = [self.ref(f) for f in value.fields]
            return
        if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.tuples:
            self.refs[var] = self.tuples[value.tuple_value][value.index]
            return
        if not (isinstance(value, relax.Call) and getattr(value.op, "name", None) == "relax.call_tir"):
            raise NoPlan(f"binding {var} is {getattr(getattr(value, 'op', None), 'name', type(value).__name__)}, "
                         "not a call_tir")
        if len(value.args) > 2:
            raise NoPlan(f"call_tir of {value.args[0].name_hint} passes symbolic arguments")
        args = [self.ref(a) for a in value.args[1].fields]
        out = self.refs[var] = self.tensor_of(var.ty)
        self.steps.append({"kernel": value.args[0].name_hint, "args": args + [out]})

    def outputs(self, body) -> list[list]:
        if body in self.tuples:
            return self.tuples[body]
        fields = body.fields if isinstance(body, relax.Tuple) else [body]
        return [self.ref(f) for f in fields]


def extract(mod: tvm.IRModule, batch: tirx.Var | None) -> tuple[dict, list]:
    """(plan as JSON, its constants in order) of ``mod["main"]``; NoPlan when it has none."""
    main = mod["main"]
    if not isinstance(main.body, relax.SeqExpr):
        raise NoPlan("main's body is not a sequence of bindings")
    ex = _Extractor(main, batch)
    for block in main.body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                raise NoPlan(f"binding {b.var} matches a shape")
            ex.binding(b.var, b.value)
    if not ex.steps:
        raise NoPlan("main calls no kernel")
    plan = {"version": PLAN_VERSION, "constants": CONSTANTS_FUNCTION, "num_inputs": len(main.params),
            "num_constants": len(ex.consts), "tensors": ex.tensors, "steps": ex.steps,
            "outputs": ex.outputs(main.body.body)}
    return share_tensors(plan), ex.consts


def share_tensors(plan: dict) -> dict:
    """``plan`` with each kernel result written into a tensor of the same shape and dtype whose last
    reader has already run (never one the same kernel reads), so memory follows the live values,
    not the number of calls. Outputs keep tensors of their own."""
    steps, tensors = plan["steps"], plan["tensors"]
    last = {i: len(steps) for kind, i in plan["outputs"] if kind == "tensor"}
    for n, step in enumerate(steps):
        for kind, i in step["args"]:
            if kind == "tensor":
                last[i] = max(last.get(i, n), n)
    slot_of: dict[int, int] = {}
    slots: list[dict] = []
    free: list[int] = []
    for n, step in enumerate(steps):
        kind, produced = step["args"][-1]
        spec = tensors[produced]
        reuse = next((s for s in free if slots[s] == spec), None)
        if reuse is None:
            slots.append(spec)
            reuse = len(slots) - 1
        else:
            free.remove(reuse)
        slot_of[produced] = reuse
        for kind, i in {tuple(a) for a in step["args"]}:
            if kind == "tensor" and last[i] == n:
                free.append(slot_of[i])
    remap = lambda refs: [[k, slot_of[i]] if k == "tensor" else [k, i] for k, i in refs]  # noqa: E731
    return {**plan, "tensors": slots, "steps": [{**s, "args": remap(s["args"])} for s in steps],
            "outputs": remap(plan["outputs"])}


def attach(mod: tvm.IRModule, batch: tirx.Var | None) -> tuple[tvm.IRModule, dict | None, str | None]:
    """(``mod`` with ``frugalrt_constants`` added, the plan, None) or (``mod``, None, why not)."""
    try:
        plan, consts = extract(mod, batch)
    except NoPlan as e:
        return mod, None, str(e)
    bb = relax.BlockBuilder(mod)
    with bb.function(CONSTANTS_FUNCTION, []):
        bb.emit_func_output(relax.Tuple(consts))
    return bb.get(), plan, None


def check_kernels(plan: dict, executable) -> str | None:
    """Why the built ``executable`` cannot serve ``plan`` (a kernel none of its modules has), or None.
    Looked up by name only: a cross-compiled module cannot be run here."""
    modules = [executable.mod, *executable.mod.imports]
    for step in plan["steps"]:
        if not any(m.implements_function(step["kernel"]) for m in modules):
            return f"the compiled library has no kernel {step['kernel']}"
    return None


# --- the plan as one C function in lib.so ------------------------------------------------------------

def driver_options() -> list[str]:
    """Compiler options for :func:`driver_source` (the TVM FFI C headers of the installed wheel)."""
    import tvm_ffi.libinfo

    # freestanding: some targets link without a C library (android-*), and their sysroot's headers
    # may not match the float ABI (android-armv7's softfp against Debian's armhf glibc)
    return ["-O2", "-ffreestanding", "-I", tvm_ffi.libinfo.find_include_path()]


_DRIVER = r"""/* frugalrt static plan driver (generated; frugalrt.targets.static_plan): main's kernel calls in order. */
#include <tvm/ffi/c_api.h> /* with -ffreestanding: the compiler's stdint.h, no C library headers */
#ifdef __cplusplus
extern "C" {
#endif
#define EXPORT __attribute__((visibility("default")))
void* calloc(__SIZE_TYPE__ count, __SIZE_TYPE__ size); /* bound at load time, as the kernels' libc calls */
void free(void* ptr);
typedef int (*frugalrt_kernel)(void*, const TVMFFIAny*, int32_t, TVMFFIAny*);
%(declarations)s
static const frugalrt_kernel KERNELS[%(steps)d] = {%(kernels)s};
static const int32_t FIRST[%(steps_plus)d] = {%(first)s};  /* step s reads ARGS[FIRST[s] .. FIRST[s+1]) */
static const int32_t ARGS[%(n_args)d] = {%(args)s};  /* slots: inputs, constants, tensors */
#define SLOTS %(slots)d
#define MAX_ARGS %(max_args)d

static int fail(const char* message) {
  TVMFFIErrorSetRaisedFromCStr("ValueError", message);
  return -1;
}

/* frugalrt_plan_bind(tensor * SLOTS) -> handle: their DLTensor pointers (the caller keeps them alive). */
EXPORT int __tvm_ffi_frugalrt_plan_bind(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result) {
  if (num_args != SLOTS) return fail("frugalrt_plan_bind: wrong number of tensors");
  TVMFFIAny* table = (TVMFFIAny*)calloc(SLOTS, sizeof(TVMFFIAny));
  if (table == 0) return fail("frugalrt_plan_bind: out of memory");
  for (int32_t i = 0; i < SLOTS; ++i) {
    table[i].type_index = kTVMFFIDLTensorPtr;
    if (args[i].type_index == kTVMFFITensor) {
      table[i].v_ptr = (char*)args[i].v_obj + sizeof(TVMFFIObject);
    } else if (args[i].type_index == kTVMFFIDLTensorPtr) {
      table[i].v_ptr = args[i].v_ptr;
    } else {
      free(table);
      return fail("frugalrt_plan_bind: every argument must be a tensor");
    }
  }
  result->type_index = kTVMFFIInt;
  result->v_int64 = (int64_t)(intptr_t)table;
  return 0;
}

/* frugalrt_plan_run(handle): every kernel of the plan, in order, on the bound tensors. */
EXPORT int __tvm_ffi_frugalrt_plan_run(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result) {
  if (num_args != 1 || args[0].type_index != kTVMFFIInt) return fail("frugalrt_plan_run: expects a handle");
  const TVMFFIAny* table = (const TVMFFIAny*)(intptr_t)args[0].v_int64;
  TVMFFIAny argv[MAX_ARGS], ret;
  for (int32_t s = 0; s < %(steps)d; ++s) {
    for (int32_t j = FIRST[s]; j < FIRST[s + 1]; ++j) argv[j - FIRST[s]] = table[ARGS[j]];
    ret.type_index = kTVMFFINone;
    int rc = KERNELS[s](0, argv, FIRST[s + 1] - FIRST[s], &ret);
    if (rc != 0) return rc;
  }
  result->type_index = kTVMFFINone;
  return 0;
}

/* frugalrt_plan_free(handle) */
EXPORT int __tvm_ffi_frugalrt_plan_free(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result) {
  if (num_args == 1 && args[0].type_index == kTVMFFIInt) free((void*)(intptr_t)args[0].v_int64);
  result->type_index = kTVMFFINone;
  return 0;
}
#ifdef __cplusplus
}
#endif
"""


def driver_source(plan: dict) -> str:
    """C source of ``frugalrt_plan_bind`` / ``_run`` / ``_free`` (module docstring of
    ``frugalrt.runtime.plan``): the plan's kernel calls with no Python between them."""
    base = {"input": 0, "const": plan["num_inputs"], "tensor": plan["num_inputs"] + plan["num_constants"]}
    kernels = [step["kernel"] for step in plan["steps"]]
    first, args = [0], []
    for step in plan["steps"]:
        args += [base[kind] + i for kind, i in step["args"]]
        first.append(len(args))
    join = lambda values: ", ".join(map(str, values))  # noqa: E731
    return _DRIVER % {
        "declarations": "\n".join(f"int __tvm_ffi_{k}(void*, const TVMFFIAny*, int32_t, TVMFFIAny*);"
                                  for k in sorted(set(kernels))),
        "steps": len(kernels), "steps_plus": len(kernels) + 1, "kernels": join(f"__tvm_ffi_{k}" for k in kernels),
        "first": join(first), "n_args": max(len(args), 1), "args": join(args) or "0",
        "slots": base["tensor"] + len(plan["tensors"]), "max_args": max(b - a for a, b in zip(first, first[1:]))}
