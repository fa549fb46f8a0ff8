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


# --- the lean call path: same numbers as the VM called directly, whatever the input's memory ----------

def _vm_output(session, x):
    """Oracle: the VM's ``main`` called on a TVM copy of ``x``, output copied out with ``.numpy()``."""
    import tvm

    return session.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x))).numpy()


def _aligned(shape, offset_bytes=0):
    """A float32 array whose data starts ``offset_bytes`` after a 64-byte boundary."""
    n = int(np.prod(shape))
    raw = np.empty(n * 4 + 128, np.uint8)
    start = -raw.ctypes.data % 64 + offset_bytes
    return raw[start:start + n * 4].view(np.float32).reshape(shape)


def _inputs(batch, kind):
    rng = np.random.default_rng(batch)
    values = rng.standard_normal((batch, 64)).astype(np.float32)
    if kind == "fresh":
        return values
    if kind == "strided":
        wide = np.repeat(values, 2, axis=0)
        return wide[::2]  # not contiguous
    if kind == "fortran":
        return np.asfortranarray(values)
    x = _aligned((batch, 64), offset_bytes=4 if kind == "misaligned" else 0)
    x[...] = values
    return x


@pytest.mark.parametrize("kind", ["fresh", "aligned", "misaligned", "strided", "fortran"])
@pytest.mark.parametrize("batch", [1, 7, 300, 4096])  # 300 x 64 float32 >= 64 KiB: zero-copy when aligned
def test_lean_path_equals_the_vm_called_directly(session, kind, batch):
    x = _inputs(batch, kind)
    keep = x.copy()
    (got,) = session(x)
    np.testing.assert_array_equal(got, _vm_output(session, keep))  # bit-identical: same kernels
    np.testing.assert_array_equal(x, keep)  # the input is never written


def test_a_batch_above_the_batch_bound_is_a_clear_error(session):
    bound = session.artifact.manifest["batch_bound"]
    with pytest.raises(ArtifactError, match=rf"batch {bound + 1} exceeds the artifact's batch_bound {bound}"):
        session(np.zeros((bound + 1, 64), np.float32))


def test_outputs_are_fresh_writable_arrays(session):
    x = _inputs(7, "fresh")
    (first,) = session(x)
    kept = first.copy()
    (second,) = session(x[::-1].copy())
    np.testing.assert_array_equal(first, kept)  # the next call does not overwrite an earlier result
    first[:] = 0
    np.testing.assert_array_equal(session(x)[0], kept)
    assert second.flags.writeable and not np.shares_memory(first, second)


@pytest.fixture(scope="module")
def alias_artifact(tmp_path_factory):
    """A model with two outputs, Relu(x) and Identity(x): the VM returns the second as the very
    tensor it was given (memory the session owns and reuses), so the session must copy it out."""
    import onnx
    from onnx import TensorProto, helper

    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 8])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["x"], ["z"])],
                              "alias", [value("x")], [value("y"), value("z")])
    path = tmp_path_factory.mktemp("alias") / "alias.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return frugalrt.compile(path, "host", path.parent / "host").path


def test_an_output_aliasing_the_input_buffer_is_copied(alias_artifact):
    s = frugalrt.load(alias_artifact)
    a = np.arange(-8, 16, dtype=np.float32).reshape(3, 8)
    first = s(a)
    second = s(a + 100)
    np.testing.assert_array_equal(first[0], np.maximum(a, 0))
    np.testing.assert_array_equal(first[1], a)  # not overwritten by the second call
    np.testing.assert_array_equal(second[1], a + 100)
    s.close()
