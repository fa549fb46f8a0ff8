"""The model zoo: whole frugal models against their dense twins in the runtimes a user would pick instead.

Models (each frugal model and its *dense twin*, the same code with ``nn.Linear`` / ``nn.Conv2d`` in place
of every structured layer; untrained, eval mode, seeded):

* ``transformer``: encoder, batch 1, sequence 64, width 256, 4 heads, 2 layers; butterfly Q/K/V/O
  projections and a butterfly MLP 256-1024-256 (GELU); attention written with matmuls + softmax,
  post-norm LayerNorm;
* ``binary CNN``: 32x32x3 input, float 3->64 stem conv + BN, six binary 3x3 convs with BN
  (64, 64, 64->128 stride 2, 128, 128->256 stride 2, 256), global average pool, float 256->10 head;
  190 M MACs, 99% of them binary;
* ``butterfly MLP``: 1024 -> butterfly 1024 -> ReLU -> butterfly 1024 -> ReLU -> linear 10, batch 1 and 32;
* ``digits``: ``examples/digits_frugal.py``'s ``make_model`` (untrained), batch 1 and 7.

Host columns, single thread, medians of round-robin samples (``benchmarks.common.side_by_side``):
``frugalrt`` is the ``host`` artifact through ``frugalrt.load`` (numpy in, numpy out: what a user
runs); the dense twin in ONNX Runtime (1 intra-op and 1 inter-op thread, sequential execution),
in ExecuTorch with the XNNPACK partitioner (optional: ``pip install -e .[bench]``; its thread pool
reset to 1 thread) and in eager PyTorch (``torch.set_num_threads(1)``). ``x`` = other ÷ frugalrt (above
1: frugalrt faster); the headline is against the faster of ORT and ExecuTorch.

Emulated Raspberry Pi 4 (``qemu-aarch64 -cpu cortex-a72``): guest instructions per whole inference
(Python call, VM or ORT session and kernels included) of the ``rpi4`` artifact run by the aarch64
TVM runtime against the dense twin in ONNX Runtime 1.19.2 for aarch64 (installed by the host pip into
the frugalrt cache once; 1.32 segfaults at import under Debian's qemu 7.2). Each count is a whole
process (the plugin counting every instruction, as it does without an address range); start-up
varies (by millions with random string hashing, far less with ``PYTHONHASHSEED=0``, set here), so one
inference is the slope ``(count(1 + N) - count(1)) / N`` with N sized for about ``EMU_BUDGET``
instructions, checked against a second slope from a shorter pilot run. The frugalrt kernels alone
(``lib.so`` code, ``frugalrt.runtime.emulator.count``) are shown too: the rest of the frugalrt count
is the device Python and the Relax VM. Instructions, not cycles.
"""
from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks.common import ort_runner, side_by_side, timer

# issue #12 item 4 targets: host, x vs the faster of ORT / ExecuTorch (dense twin)
HOST_TARGETS = {"transformer batch=1": 3.0, "binary CNN batch=1": 8.0, "butterfly MLP batch=1": 20.0,
                "butterfly MLP batch=32": 6.0, "digits batch=1": 4.0, "digits batch=7": 4.0}
# emulated rpi4: x fewer instructions than the dense twin in aarch64 ORT
EMU_TARGETS = {"digits": 8.0, "binary CNN": 6.0, "butterfly MLP": 15.0}
ORT_AARCH64 = "1.19.2"
EMU_BUDGET = 4e8  # instructions spent on the N inferences of one slope


# ----------------------------------------------------------------------------------------------- models

def _torch():
    import torch
    from torch import nn

    return torch, nn


def transformer(dense: bool, seq: int = 64, d: int = 256, heads: int = 4, layers: int = 2, mlp: int = 1024):
    torch, nn = _torch()
    from frugalrt.nn import ButterflyLinear

    linear = nn.Linear if dense else ButterflyLinear

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (linear(d, d) for _ in range(4))
            self.up, self.down = linear(d, mlp), linear(mlp, d)
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.act = nn.GELU()

        def forward(self, x):
            b, t, _ = x.shape
            split = lambda y: y.reshape(b, t, heads, d // heads).transpose(1, 2)  # noqa: E731
            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(d // heads)), dim=-1)
            y = torch.matmul(att, v).transpose(1, 2).reshape(b, t, d)
            x = self.norm1(x + self.o(y))
            return self.norm2(x + self.down(self.act(self.up(x))))

    model = nn.Sequential(*(Block() for _ in range(layers)))
    return model, [seq, d]


def binary_cnn(dense: bool, width: int = 64, classes: int = 10):
    torch, nn = _torch()
    from frugalrt.nn import BinaryConv2d

    conv = nn.Conv2d if dense else BinaryConv2d
    stages = [(width, width, 1), (width, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1),
              (2 * width, 4 * width, 2), (4 * width, 4 * width, 1)]
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)]
    for cin, cout, stride in stages:
        layers += [conv(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes)]
    return nn.Sequential(*layers), [3, 32, 32]


def butterfly_mlp(dense: bool, n: int = 1024, classes: int = 10):
    torch, nn = _torch()
    from frugalrt.nn import ButterflyLinear

    linear = nn.Linear if dense else ButterflyLinear
    return nn.Sequential(linear(n, n), nn.ReLU(), linear(n, n), nn.ReLU(), nn.Linear(n, classes)), [n]


def digits(dense: bool):
    from benchmarks.bench_model import load_example

    return load_example().make_model(dense), [64]


# name -> (builder, host batches)
MODELS = {
    "transformer": (transformer, (1,)),
    "binary CNN": (binary_cnn, (1,)),
    "butterfly MLP": (butterfly_mlp, (1, 32)),
    "digits": (digits, (1, 7)),
}
# emulated rpi4 counts: name -> batches (full run, --quick)
EMU_BATCHES = {"transformer": (1,), "binary CNN": (1,), "butterfly MLP": (1,), "digits": (1, 7)}
EMU_BATCHES_QUICK = {"butterfly MLP": (1,), "digits": (7,)}


def build(name: str, dense: bool):
    """(model in eval mode with randomized BatchNorm statistics, input shape without batch); seeded."""
    torch, nn = _torch()
    torch.manual_seed(0)
    model, shape = MODELS[name][0](dense)
    torch.manual_seed(1)
    for m in model.modules():  # non-trivial normalization, identical in both twins' structure
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval(), shape


# ------------------------------------------------------------------------------------------ host runtimes

def ort_dense_session(model_path: str):
    """ONNX Runtime CPU session: one intra-op and one inter-op thread, sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])


def executorch_unavailable() -> str | None:
    """Why the ExecuTorch column cannot run here (None: it can)."""
    _quiet_executorch_logs()
    try:
        import executorch  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
        from executorch.extension.pybindings import portable_lib  # noqa: F401
    except Exception as e:  # noqa: BLE001  (missing, or built against another torch)
        return (f"ExecuTorch unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                "`pip install -e .[bench]` adds it")
    return None


def executorch_runner(model, x):
    """The dense twin lowered by ``to_edge_transform_and_lower`` with the XNNPACK partitioner for the
    static shape of ``x``, loaded by the pybindings runtime with a one-thread pool; ``fn() -> outputs``."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings import portable_lib

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecation notices from inside the lowering
        program = torch.export.export(model, (x,))
        pte = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    portable_lib._unsafe_reset_threadpool(1)
    module = portable_lib._load_for_executorch_from_buffer(pte)  # reads ``pte`` lazily: keep it alive
    args = (x,)
    return lambda: module.forward(args) if pte else None


def _quiet_executorch_logs() -> None:
    import logging

    for name in ("executorch", "torchao", "torch._export", "torch.export", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------- emulated rpi4

_DEVICE_RUNNER = r'''
"""Run one model NUMBER times in a loop, as a user's Python on the device would (numpy in, numpy out)."""
import sys

import numpy as np

kind, path, inputs, number = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
x = np.ascontiguousarray(np.load(inputs))
if kind == "tvm":  # what frugalrt.load's LocalSession does per call (small inputs): copy into a buffer
    import json  # allocated once, run the artifact's static plan (its kernels in order, no VM) and copy
    import os  # the output out; without a plan, run main on the VM and return a DLPack view of its output

    import tvm
    from tvm.runtime.vm import VirtualMachine

    module = tvm.runtime.load_module(path)
    vm = VirtualMachine(module, tvm.cpu())
    with open(os.path.join(os.path.dirname(path), "manifest.json")) as f:
        plan = json.load(f).get("plan")
    buffer = tvm.runtime.empty(x.shape, str(x.dtype))
    view = np.from_dlpack(buffer)
    if plan:
        from frugalrt_plan import StaticPlan  # frugalrt/runtime/plan.py, copied beside this script

        call = StaticPlan(module, vm, plan).bind([buffer], x.shape[0])

        def run():
            view[...] = x
            return call()[0]
    else:
        main = vm["main"]
        view[...] = x
        first, second = main(buffer), main(buffer)
        copy = first.data_ptr() in (second.data_ptr(), buffer.data_ptr())
        del first, second

        def run():
            view[...] = x
            y = main(buffer)
            return y.numpy() if copy else np.from_dlpack(y)
else:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}

    def run():
        return session.run(None, feed)[0]
for _ in range(number):
    y = run()
print("FRUGALRT_OUT", float(np.asarray(y, np.float64).sum()), flush=True)
'''


def ensure_aarch64_site(name: str, package_dir: str, requirement: str,
                        log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """``requirement`` + numpy<2 for aarch64 cp311, installed once by the host pip into the frugalrt
    cache folder ``aarch64-py311-NAME`` (next to the emulator userland; lock + atomic rename like
    it); ``package_dir`` is the folder that shows it is there."""
    import shutil

    from frugalrt._cache import cache_dir
    from frugalrt.runtime.emulator.userland import file_lock

    final = cache_dir() / "emulator" / f"aarch64-py311-{name}"
    if (final / package_dir).is_dir():
        return final
    with file_lock(final.parent / ".setup.lock"):
        if (final / package_dir).is_dir():
            return final
        log(f"installing the aarch64 {requirement} wheel into {final} with the host pip (once)")
        tmp = Path(tempfile.mkdtemp(prefix=f".building-{name}-", dir=final.parent))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--no-warn-conflicts",
                 "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_27_aarch64",
                 "--platform", "manylinux2014_aarch64", "--python-version", "3.11", "--implementation", "cp",
                 "--abi", "cp311", "--target", str(tmp / "site"), requirement, "numpy<2"], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"pip install --platform manylinux_2_28_aarch64 {requirement} failed: "
                                   f"{(proc.stderr or proc.stdout).strip()[-400:]}")
            (tmp / "site").rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_ort_aarch64() -> Path:
    """ONNX Runtime ORT_AARCH64 for the device Python (:func:`ensure_aarch64_site`)."""
    return ensure_aarch64_site(f"onnxruntime{ORT_AARCH64}", "onnxruntime", f"onnxruntime=={ORT_AARCH64}")


class EmulatedCounter:
    """Whole-process instruction counts of ``_DEVICE_RUNNER`` under qemu-aarch64 (Cortex-A72)."""

    def __init__(self, tmp: str, budget: float):
        import shutil

        from frugalrt.runtime import plan as plan_module
        from frugalrt.runtime.emulator.userland import ensure_userland

        self.userland, self.ort_site = ensure_userland(), ensure_ort_aarch64()
        self.tmp, self.budget = Path(tmp), budget
        self.script = self.tmp / "device_runner.py"
        self.script.write_text(_DEVICE_RUNNER)
        shutil.copyfile(Path(plan_module.__file__), self.tmp / "frugalrt_plan.py")

    def command(self, kind: str, path: str, inputs: str, number: int) -> list[str]:
        cmd = self.userland.command(str(self.script), kind, path, inputs, str(number),
                                    env={"TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
        if kind == "ort":  # ORT's own site (numpy<2) instead of the TVM runtime's
            cmd[cmd.index(f"PYTHONPATH={self.userland.site}")] = f"PYTHONPATH={self.ort_site}"
        return cmd

    def count(self, kind: str, path: str, inputs: str, number: int) -> int:
        from frugalrt.runtime.qemu_plugin import count_in_range

        return count_in_range(self.command(kind, path, inputs, number), cwd=self.tmp, timeout=900)  # all code

    def per_inference(self, kind: str, path: str, x: np.ndarray, pilot: int = 3) -> dict:
        """(count(1 + N) - count(1)) / N, N sized from a pilot count(1 + pilot) for ~budget instructions;
        ``check``: the slope from the pilot run instead of the 1-run one (their gap is start-up noise)."""
        inputs = str(self.tmp / f"x-{x.shape[0]}-{x.size}.npy")
        np.save(inputs, x)
        start = time.perf_counter()
        base, short = (self.count(kind, path, inputs, n) for n in (1, 1 + pilot))
        rough = max((short - base) / pilot, 1e4)
        n = int(min(max(self.budget / rough, pilot + 3), 20000))
        full = self.count(kind, path, inputs, 1 + n)
        slope, check = (full - base) / n, (full - short) / (n - pilot)
        return {"instructions": round(slope), "check": round(check), "n": n, "startup": base,
                "wall_s": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------------------------- run

def _export_and_compile(name: str, tmp: str, emulated: bool) -> dict:
    """Both twins exported (``frugalrt.export``; the dense one is what ORT runs), the frugal one
    compiled for ``host`` (and ``rpi4`` when ``emulated``)."""
    import torch

    import frugalrt
    from frugalrt.targets.compile import compile as frugal_compile

    frugal, shape = build(name, dense=False)
    dense, _ = build(name, dense=True)
    folder = Path(tmp) / name.replace(" ", "_")
    folder.mkdir()
    example = torch.randn(2, *shape)
    frugalrt.export(frugal, (example,), folder / "frugal.onnx")
    frugalrt.export(dense, (example,), folder / "dense.onnx")
    start = time.perf_counter()
    out = {"frugal": frugal, "dense": dense, "shape": shape, "dense_onnx": str(folder / "dense.onnx"),
           "host": frugal_compile(folder / "frugal.onnx", "host", folder / "host")}
    out["compile_s"] = round(time.perf_counter() - start, 1)
    if emulated:
        out["rpi4"] = frugal_compile(folder / "frugal.onnx", "rpi4", folder / "rpi4")
    return out


def _max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def time_case(name: str, batch: int, m: dict, repeat: int, et_reason: str | None) -> dict:
    import torch

    import frugalrt

    x = torch.randn(batch, *m["shape"], generator=torch.Generator().manual_seed(batch))
    xn = x.numpy()
    session = frugalrt.load(m["host"].path)
    ort = ort_dense_session(m["dense_onnx"])
    with torch.no_grad():
        want, want_dense = m["frugal"](x).numpy(), m["dense"](x).numpy()
    errors = {"frugalrt vs torch frugal": _max_abs(session(xn)[0], want),
              "ORT vs torch dense": _max_abs(ort_runner(ort, xn)()[0], want_dense)}
    samplers = {"frugalrt": timer(lambda: session(xn)), "ORT dense twin": timer(ort_runner(ort, xn))}
    skipped = {}
    if et_reason is None:
        try:
            et = executorch_runner(m["dense"], x)
            errors["ExecuTorch vs torch dense"] = _max_abs(et()[0], want_dense)
            samplers["ExecuTorch XNNPACK dense twin"] = timer(et)
        except Exception as e:  # noqa: BLE001  (report and go on with the other columns)
            skipped["ExecuTorch XNNPACK dense twin"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    else:
        skipped["ExecuTorch XNNPACK dense twin"] = et_reason
    dense = m["dense"]

    def eager():
        with torch.no_grad():
            return dense(x)

    samplers["torch eager dense twin"] = timer(eager)
    times = side_by_side(samplers, repeat)
    ours = times["frugalrt"]
    ratios = {k: v / ours for k, v in times.items() if k != "frugalrt"}
    fast = [times[k] for k in ("ORT dense twin", "ExecuTorch XNNPACK dense twin") if k in times]
    target = HOST_TARGETS.get(f"{name} batch={batch}")
    row = {"bench": "models", "case": f"{name} batch={batch}", "times_us": times, "ratios": ratios,
           "headline": min(fast) / ours, "target": target, "max_abs": errors, "skipped_columns": skipped,
           "compile_s": m["compile_s"]}
    print(f"models {row['case']}: frugalrt {ours:.1f} µs, x{row['headline']:.1f} vs the faster of ORT/ExecuTorch "
          f"({_met(row['headline'], target) or 'no target'}); max abs {', '.join(f'{k} {v:.1e}' for k, v in errors.items())}", file=sys.stderr)
    return row


def count_case(name: str, batch: int, m: dict, counter: EmulatedCounter) -> dict:
    """Instructions per whole inference of the rpi4 artifact and of the dense twin in aarch64 ORT (run
    concurrently), plus the frugalrt kernels alone (``lib.so`` code, ``frugalrt.runtime.emulator.count``)."""
    from concurrent.futures import ThreadPoolExecutor

    from frugalrt.runtime.emulator.count import count_instructions

    x = np.random.default_rng(batch).standard_normal([batch, *m["shape"]]).astype(np.float32)
    lib = str(m["rpi4"].lib_path)
    with ThreadPoolExecutor(2) as pool:
        ours = pool.submit(counter.per_inference, "tvm", lib, x)
        theirs = pool.submit(counter.per_inference, "ort", m["dense_onnx"], x)
        ours, theirs = ours.result(), theirs.result()
    kernels = count_instructions(lib, [x], runs=2)["instructions"]
    target = EMU_TARGETS.get(name)
    row = {"bench": "models-rpi4", "case": f"{name} batch={batch}", "device": "qemu-aarch64 -cpu cortex-a72",
           "instructions": {"frugalrt": ours, f"ORT {ORT_AARCH64} dense twin": theirs, "frugalrt kernels only": kernels},
           "ratio": theirs["instructions"] / ours["instructions"], "target": target}
    print(f"models {row['case']} on rpi4: frugalrt {ours['instructions']:,} (kernels {kernels:,}) vs ORT "
          f"{theirs['instructions']:,} instructions per inference: x{row['ratio']:.2f} ({_met(row['ratio'], target) or 'no target'}); "
          f"N = {ours['n']} / {theirs['n']}, pilot slopes {ours['check']:,} / {theirs['check']:,}, "
          f"{ours['wall_s']} / {theirs['wall_s']} s", file=sys.stderr)
    return row


def emulation_unavailable() -> str | None:
    import shutil

    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 not found (apt-get install qemu-user)"
    if shutil.which("gcc") is None:
        return "gcc not found (builds the qemu counting plugin)"
    return None


def run(args) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    quick = getattr(args, "quick", False)
    repeat = 5 if quick else 30
    et_reason = executorch_unavailable()
    if et_reason:
        print(f"models: ExecuTorch column skipped: {et_reason}", file=sys.stderr)
    emu_reason = emulation_unavailable()
    if emu_reason:
        print(f"models: emulated rpi4 counts skipped: {emu_reason}", file=sys.stderr)
    emu_batches = {} if emu_reason else EMU_BATCHES_QUICK if quick else EMU_BATCHES
    rows, emu_rows = [], []
    with tempfile.TemporaryDirectory(prefix="frugalrt-bench-models-") as tmp:
        built = {}
        for name, (_, batches) in MODELS.items():
            try:
                built[name] = m = _export_and_compile(name, tmp, name in emu_batches)
                for batch in batches:
                    rows.append(time_case(name, batch, m, repeat, et_reason))
            except Exception as e:  # noqa: BLE001  (one broken model must not hide the others)
                rows.append({"bench": "models", "case": name, "skipped": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"models {name}: failed ({type(e).__name__}: {str(e)[:300]})", file=sys.stderr)
        if emu_batches:  # after all host timings: qemu must not run beside them
            try:
                counter = EmulatedCounter(tmp, 3e7 if quick else EMU_BUDGET)
            except Exception as e:  # noqa: BLE001  (no userland or aarch64 ORT: say why, keep the host table)
                emu_reason = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"models: emulated rpi4 counts skipped: {emu_reason}", file=sys.stderr)
                emu_batches = {}
        for name, batches in emu_batches.items():
            for batch in batches if "rpi4" in built.get(name, {}) else ():
                try:
                    emu_rows.append(count_case(name, batch, built[name], counter))
                except Exception as e:  # noqa: BLE001
                    emu_rows.append({"bench": "models-rpi4", "case": f"{name} batch={batch}",
                                     "skipped": f"{type(e).__name__}: {str(e)[:300]}"})
                    print(f"models {name} batch={batch} on rpi4: failed ({type(e).__name__}: {str(e)[:300]})",
                          file=sys.stderr)
    print(format_tables(rows, emu_rows, et_reason, emu_reason))
    return rows + emu_rows


def _met(value: float, target: float | None) -> str:
    return "" if target is None else f">= {target:g}x: {'met' if value >= target else 'not met'}"


def format_tables(rows: list[dict], emu_rows: list[dict], et_reason: str | None = None,
                  emu_reason: str | None = None) -> str:
    """Two Markdown tables in the README's style: host times with ratios, rpi4 instruction counts."""
    impls = ("ORT dense twin", "ExecuTorch XNNPACK dense twin", "torch eager dense twin")
    lines = ["| model (frugal vs its dense twin) | frugalrt µs | ONNX Runtime µs (x) | ExecuTorch XNNPACK µs (x) "
             "| torch eager µs (x) | x vs faster of ORT / ExecuTorch | target (issue #12) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "times_us" not in r:
            lines.append(f"| {r['case']} | skipped: {r.get('skipped', '')} | | | | | |")
            continue
        t = r["times_us"]
        cells = [f"{t[k]:.1f} ({r['ratios'][k]:.1f}x)" if k in t else "–" for k in impls]
        lines.append(f"| {r['case']} | {t['frugalrt']:.1f} | {' | '.join(cells)} | {r['headline']:.1f}x | "
                     f"{_met(r['headline'], r['target'])} |")
    skipped = {k: v for r in rows for k, v in r.get("skipped_columns", {}).items()}
    for column, why in skipped.items():
        lines.append(f"\n{column}: skipped: {why}")
    if et_reason and not skipped:
        lines.append(f"\nExecuTorch XNNPACK dense twin: skipped: {et_reason}")
    lines += ["", f"| model, emulated rpi4 (qemu-aarch64 Cortex-A72) | frugalrt instructions | of which kernels (lib.so) "
              f"| ONNX Runtime {ORT_AARCH64} dense twin | x fewer | target (issue #12) |", "|---|---:|---:|---:|---:|---|"]
    for r in emu_rows:
        if "instructions" not in r:
            lines.append(f"| {r['case']} | skipped: {r.get('skipped', '')} | | | | |")
            continue
        i = r["instructions"]
        lines.append(f"| {r['case']} | {i['frugalrt']['instructions']:,} | {i['frugalrt kernels only']:,} | "
                     f"{i[f'ORT {ORT_AARCH64} dense twin']['instructions']:,} | {r['ratio']:.1f}x | "
                     f"{_met(r['ratio'], r['target'])} |")
    if emu_reason:
        lines.append(f"| skipped: {emu_reason} | | | | | |")
    return "\n".join(lines)
