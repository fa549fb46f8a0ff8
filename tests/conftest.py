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
