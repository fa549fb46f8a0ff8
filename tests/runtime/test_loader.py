"""``frugalrt.load`` on the local device: the host artifact vs PyTorch, and clear errors (compile tier)."""
import numpy as np
import pytest
import torch

import frugalrt
from frugalrt.errors import ArtifactError, DeviceError
from frugalrt.runtime.artifact import Artifact

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def session(digits_host_artifact):
    s = frugalrt.load(digits_host_artifact)
    yield s
    s.close()


@pytest.mark.parametrize("batch", [1, 7, 3])
def test_matches_pytorch_for_any_batch(session, digits_example, batch):
    model, (x,) = digits_example
    x = torch.cat([x, x.flip(0)])[:batch]
    with torch.no_grad():
        want = model(x).numpy()
    (got,) = session(x.numpy())
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_repeated_calls_reuse_buffers_and_stay_correct(session, digits_example):
    _, (x,) = digits_example
    first = session(x.numpy())[0]
    second = session(x.numpy()[::-1].copy())[0]
    np.testing.assert_array_equal(second, first[::-1])


@pytest.mark.parametrize("x,message", [
    (np.zeros((2, 63), np.float32), r"input 'input': shape \[2, 63\], expected \['batch', 64\]"),
    (np.zeros((2, 64), np.float64), "input 'input': dtype float64, expected float32"),
    (np.zeros(64, np.float32), r"shape \[64\]"),
])
def test_wrong_input_is_a_clear_error(session, x, message):
    with pytest.raises(ArtifactError, match=message):
        session(x)


def test_foreign_artifact_and_unknown_device_are_refused(digits_host_artifact, tmp_path):
    with pytest.raises(ArtifactError, match="not a frugalrt artifact"):
        frugalrt.load(tmp_path)
    with pytest.raises(DeviceError, match="unknown device 'warp://x'"):
        frugalrt.load(digits_host_artifact, device="warp://x")
    arm = tmp_path / "rpi4"
    arm.mkdir()
    manifest = Artifact(digits_host_artifact).manifest | {"target": "rpi4"}
    (arm / "manifest.json").write_text(__import__("json").dumps(manifest))
    with pytest.raises(DeviceError, match="rpi4 shared-lib cannot run on this machine"):
        frugalrt.load(arm)
