"""Test tiers: fast (no TVM), ``compile`` (TVM), ``emulated`` (qemu, cross toolchains, RPC)."""
import importlib.util
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
