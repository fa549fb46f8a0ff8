"""The example model (examples/digits_frugal.py) end to end, batch 7 (its example inputs) and 1.

frugalrt: the ``host`` artifact in the Relax VM (``frugalrt.compile``). Baselines: the same model's
portable standard-op export in ONNX Runtime, and the dense-equivalent model (``build_dense``)
in ONNX Runtime and in eager PyTorch.
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

from benchmarks.common import case, compile_host_vm, ort_runner, ort_session, side_by_side, timer, tvm_timer


def load_example():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import digits_frugal

    return digits_frugal


def run(args) -> list[dict]:
    import torch
    import tvm

    import frugalrt

    example = load_example()
    model, (x,) = example.build()
    dense, _ = example.build_dense()
    repeat = 5 if args.quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        frugal = frugalrt.export(model, (x,), os.path.join(tmp, "f.onnx"))
        portable = frugalrt.export(model, (x,), os.path.join(tmp, "p.onnx"), portable=True)
        dense_onnx = frugalrt.export(dense, (x,), os.path.join(tmp, "d.onnx"))
    vm, _ = compile_host_vm(frugal)
    rows = []
    for batch in (7, 1):
        xb = x[:batch].numpy()
        xt = tvm.runtime.tensor(xb, tvm.cpu())
        agree = float(np.abs(vm["main"](xt).numpy() - model(x[:batch]).detach().numpy()).max())
        with torch.no_grad():
            times = side_by_side({
                "frugalrt": tvm_timer(vm, "main", [xt]),
                "ORT portable export": timer(ort_runner(ort_session(portable), xb)),
                "ORT dense model": timer(ort_runner(ort_session(dense_onnx), xb)),
                "torch dense model": timer(lambda: dense(x[:batch])),
                "torch frugal model (eager)": timer(lambda: model(x[:batch]))}, repeat)
        rows.append(case("model", f"digits batch={batch}", times, {"max_abs_vs_torch": agree}))
        print(f"model batch={batch}: done (max abs vs torch {agree:.1e})", file=sys.stderr)
    return rows
