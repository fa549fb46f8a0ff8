"""Emulated-tier fixtures: the digits example compiled for rpi4 (the session's emulated rpi4 and the
example's dense twin are in tests/conftest.py)."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_rpi4_artifact(digits_onnx, emulation_tools, tmp_path_factory) -> Path:
    """The digits example compiled for rpi4 (cross-linked aarch64 lib.so)."""
    import frugalrt

    out = tmp_path_factory.mktemp("artifacts") / "rpi4"
    frugalrt.compile(digits_onnx, "rpi4", out)
    return out
