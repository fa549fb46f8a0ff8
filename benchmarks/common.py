"""Shared benchmark plumbing: one thread everywhere, warm-up, medians, side-by-side ratios, tables.

Every case times all its implementations in the same process, one sample of each in turn
(:func:`side_by_side`), so the ratios (``baseline time / frugalrt time``, > 1 means frugalrt is
faster) are comparable even on a shared, noisy machine where absolute times drift.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Callable

THREAD_VARS = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def single_thread() -> None:
    """Pin every runtime to one thread (call before importing torch, tvm or onnxruntime)."""
    for var in THREAD_VARS:
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)


def timer(fn: Callable[[], object], warmup: int = 3, min_s: float = 2e-3) -> Callable[[], float]:
    """A sampler of ``fn``: each call returns µs per call over a loop long enough (>= min_s), after one
    untimed call (as TVM's ``time_evaluator`` does) so that no sample starts on caches another left cold."""
    for _ in range(warmup):
        fn()
    start, number = time.perf_counter(), 0
    while time.perf_counter() - start < min_s or number == 0:
        fn()
        number += 1

    def sample() -> float:
        fn()
        t = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t) / number * 1e6

    return sample


def tvm_timer(module, name: str, args: list) -> Callable[[], float]:
    """A sampler of TVM's ``time_evaluator`` (C++ timing loop, preallocated tensors, no conversions)."""
    import tvm

    evaluator = module.time_evaluator(name, tvm.cpu(), number=1, repeat=1, min_repeat_ms=2)
    evaluator(*args)  # warm-up
    return lambda: evaluator(*args).results[0] * 1e6


def side_by_side(samplers: dict[str, Callable[[], float]], repeat: int = 30) -> dict[str, float]:
    """Median µs of each sampler, taken round-robin: drift on a shared machine hits every implementation
    alike, so the ratios hold even when absolute times move."""
    samples: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(repeat):
        for name, sample in samplers.items():
            samples[name].append(sample())
    return {name: statistics.median(values) for name, values in samples.items()}


def host_target():
    from frugalrt.targets.registry import tvm_target

    return tvm_target("host")


def ort_session(model):
    """ONNX Runtime CPU session, one intra-op and one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def ort_runner(session, x) -> Callable[[], object]:
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def dense_matmul_onnx(weight_t):
    """ONNX model Y = X @ W with W ([in, out] float32) an initializer, batch dynamic."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "dense",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", weight_t.shape[0]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", weight_t.shape[1]])],
        [numpy_helper.from_array(np.ascontiguousarray(weight_t, np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def compile_host_vm(model):
    """``frugalrt.compile`` an ONNX model for ``host``; returns (VirtualMachine, lib module)."""
    import tvm
    from tvm import relax

    import frugalrt.targets.compile as frt_compile

    import onnx

    with tempfile.TemporaryDirectory(prefix="frugalrt-bench-") as tmp:  # the library stays loaded
        path = os.path.join(tmp, "model.onnx")
        onnx.save(model, path)
        artifact = frt_compile.compile(path, "host", os.path.join(tmp, "artifact"))
        lib = tvm.runtime.load_module(str(artifact.lib_path))
    return relax.VirtualMachine(lib, tvm.cpu()), lib


def case(bench: str, name: str, times: dict[str, float], extra: dict | None = None) -> dict:
    """A result row: times in µs and ``ratios[impl] = time(impl) / time(frugalrt)``."""
    ours = times.get("frugalrt")
    ratios = {k: v / ours for k, v in times.items() if ours and k != "frugalrt" and v == v}
    return {"bench": bench, "case": name, "times_us": times, "ratios": ratios, **(extra or {})}


def format_table(rows: list[dict]) -> str:
    lines = ["| bench | case | implementation | median µs | x frugalrt |", "|---|---|---|---:|---:|"]
    for row in rows:
        for impl, t in row["times_us"].items():
            ratio = "1" if impl == "frugalrt" else (f"{row['ratios'][impl]:.1f}" if impl in row["ratios"] else "-")
            lines.append(f"| {row['bench']} | {row['case']} | {impl} | {t:.1f} | {ratio} |")
        for key in ("binary_gmacs",):
            if key in row:
                lines.append(f"| {row['bench']} | {row['case']} | frugalrt binary GMAC/s | {row[key]:.0f} | |")
    return "\n".join(lines)
