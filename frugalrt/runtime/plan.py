"""Run a compiled model's static plan (``frugalrt.targets.static_plan``) without the Relax VM.

Only ``tvm`` and ``numpy`` are imported, so the same file runs in a device's Python next to the
TVM runtime wheel. Per batch size, once: every tensor of the plan is allocated and bound. Per call:
the kernels run in order (the caller has filled the inputs), and the outputs are copied out (the
tensors are reused by the next call). Libraries built with the plan's C driver (``lib.so`` exports
``frugalrt_plan_bind`` / ``frugalrt_plan_run`` / ``frugalrt_plan_free``) run all kernels in one
call from Python; others get a Python loop over the kernels, with the same results.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import numpy as np

_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul,
                                              "//": operator.floordiv, "%": operator.mod, "max": max, "min": min}


def dim(expr: Any, batch: int) -> int:
    """Evaluate a plan shape dimension (an int, ``"batch"`` or ``[op, a, b]``) for ``batch``."""
    if isinstance(expr, int):
        return expr
    if expr == "batch":
        return batch
    op, a, b = expr
    return _OPS[op](dim(a, batch), dim(b, batch))


class StaticPlan:
    """The plan's kernels and constants, looked up once in a loaded ``lib.so``."""

    def __init__(self, module, vm, plan: dict):
        self.plan = plan
        self.kernels = [module.get_function(s["kernel"], query_imports=True) for s in plan["steps"]]
        self.constants = list(vm[plan["constants"]]())
        self.driver = None
        if module.implements_function("frugalrt_plan_run", query_imports=True):
            self.driver = [module.get_function(f"frugalrt_plan_{name}", query_imports=True)
                           for name in ("bind", "run", "free")]

    def bind(self, inputs: Sequence, batch: int) -> Callable[[], list[np.ndarray]]:
        """A call that runs the plan on the TVM tensors ``inputs`` (filled by the caller before each
        call) and returns copies of the outputs."""
        import tvm

        tensors = [tvm.runtime.empty([dim(d, batch) for d in t["shape"]], t["dtype"]) for t in self.plan["tensors"]]
        pools = {"input": list(inputs), "const": self.constants, "tensor": tensors}
        views = [np.from_dlpack(pools[kind][i]) for kind, i in self.plan["outputs"]]
        if self.driver is not None:
            return _DriverCall(self.driver, [*inputs, *self.constants, *tensors], views)
        steps = [(kernel, [pools[kind][i] for kind, i in step["args"]])
                 for kernel, step in zip(self.kernels, self.plan["steps"])]

        def run() -> list[np.ndarray]:
            for kernel, args in steps:
                kernel(*args)
            return [v.copy() for v in views]

        return run


class _DriverCall:
    """The C driver bound to ``tensors`` (kept alive here, as the driver holds their pointers)."""

    def __init__(self, driver: list, tensors: list, views: list[np.ndarray]):
        bind, self._run, self._free = driver
        self._tensors, self._views = tensors, views
        self._handle = bind(*tensors)

    def __call__(self) -> list[np.ndarray]:
        self._run(self._handle)
        return [v.copy() for v in self._views]

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._free(self._handle)
