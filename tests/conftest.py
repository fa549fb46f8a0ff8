"""Test tiers: fast (no TVM), ``compile`` (TVM), ``emulated`` (qemu, cross toolchains, RPC)."""
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def digits_module():
    """``examples/digits_frugal.py`` as a module."""
    path = Path(__file__).parents[1] / "examples" / "digits_frugal.py"
    spec = importlib.util.spec_from_file_location("digits_frugal", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.fixture(scope="session")
def digits_example(digits_module):
    """(untrained digits model, (x_test[:7],)): the example's exact graph without its training time."""
    torch.manual_seed(0)
    model = digits_module.make_model().eval()
    return model, (digits_module.load_data()[2][:7],)


@pytest.fixture(scope="session")
def digits_onnx(digits_example, tmp_path_factory) -> Path:
    """The digits example exported with ``ai.frugalrt`` ops (golden vectors included)."""
    import frugalrt

    path = tmp_path_factory.mktemp("digits") / "digits_frugal.onnx"
    frugalrt.export(*digits_example, path)
    return path


@pytest.fixture(scope="session")
def digits_host_artifact(digits_onnx, tmp_path_factory) -> Path:
    """The digits example compiled for ``host`` (compile tier: needs TVM)."""
    import frugalrt

    out = tmp_path_factory.mktemp("artifacts") / "host"
    frugalrt.compile(digits_onnx, "host", out)
    return out


@pytest.fixture(scope="session")
def digits_dense_onnx(digits_module, digits_example, tmp_path_factory) -> Path:
    """The example's dense twin (``nn.Linear`` everywhere, untrained), exported to ONNX: the
    baseline that profiles compare the frugal model against."""
    import frugalrt

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("digits-dense") / "dense.onnx"
    frugalrt.export(digits_module.make_model(dense=True).eval(), digits_example[1], path)
    return path


# --- emulated tier: one emulated Raspberry Pi 4 per test session (cached userland) ---------------
NEEDS = ("qemu-aarch64", "aarch64-linux-gnu-g++", "apt-get", "dpkg")


@pytest.fixture(scope="session")
def emulation_tools() -> None:
    missing = [tool for tool in NEEDS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"emulated rpi4 needs {', '.join(missing)} (Debian: qemu-user, g++-aarch64-linux-gnu)")


@pytest.fixture(scope="session")
def device_state(tmp_path_factory):
    """A private state dir for device records, so tests never touch the user's running devices;
    every server still running at the end of the session is stopped."""
    old = os.environ.get("FRUGALRT_STATE_DIR")
    os.environ["FRUGALRT_STATE_DIR"] = str(tmp_path_factory.mktemp("device-state"))
    yield Path(os.environ["FRUGALRT_STATE_DIR"])
    from frugalrt.runtime.emulator import stop_devices

    stop_devices()
    if old is None:
        del os.environ["FRUGALRT_STATE_DIR"]
    else:
        os.environ["FRUGALRT_STATE_DIR"] = old


@pytest.fixture(scope="session")
def rpi4_device(device_state, emulation_tools):
    """``rpc://127.0.0.1:PORT`` of an emulated rpi4 shared by the session."""
    from frugalrt.runtime.emulator import start_device, stop_devices

    rec = start_device("rpi4-emu", name="session-rpi4")
    yield rec.address
    stop_devices([rec.name])


# --- tools: a test that needs a missing tool skips, naming it and its Debian package -------------
DEBIAN_PACKAGES = {
    "g++": "g++", "gcc": "gcc", "qemu-aarch64": "qemu-user", "qemu-arm": "qemu-user",
    "qemu-system-arm": "qemu-system-arm", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "arm-linux-gnueabihf-gcc": "gcc-arm-linux-gnueabihf",
    "arm-none-eabi-gcc": "gcc-arm-none-eabi libnewlib-arm-none-eabi", "nvcc": "nvidia-cuda-toolkit",
    "apt-get": "apt", "dpkg": "dpkg",
}


@pytest.fixture(scope="session")
def need_tools():
    """``need_tools(*tools, why=...)``: skip the test, naming each missing tool and its Debian package."""

    def need(*tools: str, why: str = "") -> None:
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            pytest.skip(f"{why + ' needs ' if why else 'needs '}"
                        + ", ".join(f"{t} (Debian: apt-get install {DEBIAN_PACKAGES.get(t, t)})" for t in missing))

    return need


# --- x86 CPUs named explicitly: compile for each, run only where this CPU can ------------------------
class X86Cpu:
    """An x86-64 CPU named by its LLVM ``mcpu`` (never the CPU LLVM detects here), its TVM target, and the
    ISA extensions (LLVM names) its code may use that this machine lacks: empty = runs here."""

    def __init__(self, mcpu: str):
        import platform

        import tvm
        from tvm.target import codegen

        from frugalrt.runtime.loader import host_cpu_flags
        from frugalrt.targets.registry import X86_FEATURES, X86_LEVELS

        self.mcpu = mcpu
        self.target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})
        with self.target:
            needs = sorted(str(f) for f in codegen.llvm_get_cpu_features(self.target) if str(f) in X86_FEATURES)
        if platform.machine().lower() not in ("x86_64", "amd64"):
            self.missing = ["an x86-64 CPU"]
            return
        flags = host_cpu_flags()
        if flags is None:  # unknown CPU flags: only the baseline is safe to run
            missing = [f for f in needs if f not in X86_LEVELS["x86-64-v1"]]
        else:
            missing = [f for f in needs if X86_FEATURES[f] not in flags]
        order = list(X86_FEATURES)  # oldest extensions first
        self.missing = sorted(missing, key=order.index, reverse=True)  # the newest, most telling, first

    @property
    def runs_here(self) -> bool:
        return not self.missing

    def require(self, inspected_by: str) -> None:
        """Skip unless this machine runs ``mcpu`` code; ``inspected_by`` names the test that compiles
        and inspects it everywhere."""
        if self.missing:
            pytest.skip(f"this CPU lacks {self.lacks}: {self.mcpu} code is compiled and inspected (not run) "
                        f"by {inspected_by}")

    @property
    def lacks(self) -> str:
        """The missing extensions, newest first, for a skip reason: ``avx2, avx, fma and 13 more``."""
        more = len(self.missing) - 3
        return ", ".join(self.missing[:3]) + (f" and {more} more" if more > 0 else "")

    def __repr__(self) -> str:
        return f"X86Cpu({self.mcpu!r}, runs_here={self.runs_here})"


@pytest.fixture(scope="session")
def x86_cpu():
    """``x86_cpu(mcpu) -> X86Cpu`` (cached): an explicitly named x86-64 CPU target and whether it runs here
    (its ISA extensions checked against this CPU's flags, ``frugalrt.runtime.loader.host_cpu_flags``)."""
    cache: dict[str, X86Cpu] = {}

    def get(mcpu: str) -> X86Cpu:
        if mcpu not in cache:
            cache[mcpu] = X86Cpu(mcpu)
        return cache[mcpu]

    return get


@pytest.fixture
def binary_net():
    """``make(c_in, c1, c2, pixels, hidden, seed)``: BinaryConv2d(c_in, c1, pad 1), BN, Hardtanh,
    BinaryConv2d(c1, c2, stride 2), BN, Hardtanh, Flatten, BinaryLinear(c2 * pixels, hidden), BN,
    Hardtanh, BinaryLinear(hidden, 5), in eval mode, with random BN statistics and gammas in
    [-1.5, 1.5] (negative folded scales too); ``pixels`` = the second conv's OH * OW."""
    import torch
    from torch import nn

    from frugalrt.nn import BinaryConv2d, BinaryLinear

    def make(c_in: int, c1: int, c2: int, pixels: int, hidden: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        net = nn.Sequential(BinaryConv2d(c_in, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.Hardtanh(),
                            BinaryConv2d(c1, c2, 3, stride=2), nn.BatchNorm2d(c2), nn.Hardtanh(), nn.Flatten(),
                            BinaryLinear(c2 * pixels, hidden), nn.BatchNorm1d(hidden), nn.Hardtanh(),
                            BinaryLinear(hidden, 5))
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 3)
                m.weight.data.uniform_(-1.5, 1.5)
        return net.eval()

    return make
