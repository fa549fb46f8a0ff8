"""Emulated-tier fixtures: one emulated Raspberry Pi 4 per test session (cached userland) and the
digits example compiled for rpi4 (its dense twin, ``digits_dense_onnx``, is in tests/conftest.py)."""
import os
import shutil
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def digits_rpi4_artifact(digits_onnx, emulation_tools, tmp_path_factory) -> Path:
    """The digits example compiled for rpi4 (cross-linked aarch64 lib.so)."""
    import frugalrt

    out = tmp_path_factory.mktemp("artifacts") / "rpi4"
    frugalrt.compile(digits_onnx, "rpi4", out)
    return out
