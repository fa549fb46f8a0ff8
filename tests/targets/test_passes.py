"""The compile pipeline's graph passes (frugalrt.export.fold on import, frugalrt.targets.passes on
Relax): what the Relax IR keeps, and the compiled artifacts against PyTorch and against the numpy
reference kernels run on the rewritten graph (compile tier)."""
import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import frugalrt
from frugalrt.export.fold import optimize_graph
from frugalrt.export.metadata import read_golden
from frugalrt.nn import BinaryConv2d, BinaryLinear, ButterflyLinear
from frugalrt.runtime.ort import run as run_reference

pytestmark = pytest.mark.compile


def _randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _export(model, x, path, **kwargs):
    frugalrt.export(model, (x,), path, **kwargs)
    return onnx.load(path)


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The numpy reference kernels (through ONNX Runtime) on the graph the compiler imports."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    optimize_graph(rewritten)
    return run_reference(rewritten, [x])[0]


def _ops_in(mod) -> Counter:
    """Relax op names called in every Relax function of ``mod`` (``call_tir`` counted per kernel)."""
    from tvm import relax

    ops = Counter()
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            def visit(e):
                op = getattr(e, "op", None)
                if op is not None and hasattr(op, "name"):
                    ops[op.name] += 1

            relax.analysis.post_order_visit(func.body, visit)
    return ops


def _call_tirs(func) -> list[str]:
    from tvm import relax

    names = []

    def visit(e):
        op = getattr(e, "op", None)
        if getattr(op, "name", None) == "relax.call_tir":
            names.append(e.args[0].name_hint)

    relax.analysis.post_order_visit(func.body, visit)
    return names


@pytest.fixture(scope="module")
def digits_bn(digits_module, tmp_path_factory):
    """(model with non-trivial BatchNorm statistics, x, exported unfolded ONNX)."""
    torch.manual_seed(3)
    model = _randomize_bn(digits_module.make_model())
    x = digits_module.load_data()[2][:7]
    path = tmp_path_factory.mktemp("digits-bn") / "d.onnx"
    return model, x, _export(model, x, path, fold_bn=False, pack_activations=False)  # the compiler does it all


@pytest.fixture(scope="module")
def digits_bn_host(digits_bn, tmp_path_factory):
    _, _, model = digits_bn
    path = tmp_path_factory.mktemp("digits-bn-host")
    onnx.save(model, path / "d.onnx")
    return frugalrt.compile(path / "d.onnx", "host", path / "host")


def test_digits_relax_main_before_and_after(digits_bn):
    from frugalrt.targets import passes
    from frugalrt.targets.importer import import_onnx
    from frugalrt.targets.registry import tvm_target

    _, _, model = digits_bn
    target = tvm_target("host")
    before = _ops_in(import_onnx(model, target, optimize=False))
    assert before["relax.nn.batch_norm"] == 3 and before["relax.isnan"] == 6 and before["relax.reshape"] == 3
    mod = passes.optimize(import_onnx(model, target), target)
    after = _ops_in(mod)
    for op in ("relax.nn.batch_norm", "relax.isnan", "relax.where", "relax.reshape", "relax.permute_dims",
               "relax.matmul", "relax.clip", "relax.maximum"):
        assert after[op] == 0, (op, after)
    kernels = _call_tirs(mod["main"])
    assert len(kernels) == 4, kernels  # butterfly, 2 binary GEMMs (the last with the Hardtanh), matmul + bias
    assert kernels[0].startswith("frugalrt_butterfly")
    assert all(k.startswith("frugalrt_binary_gemm") for k in kernels[1:3]) and kernels[2].endswith("_clip")
    assert dict(mod["main"].attrs["tir_var_upper_bound"]) == {"batch": passes.DEFAULT_BATCH_BOUND}


def test_planned_main_allocates_only_constant_sized_storage(digits_bn):
    """After tvm.compile's lowering: every alloc_storage of main but the output's has a constant size
    (no shape computation per call), and there are at most three of them."""
    import tvm
    from tvm import relax

    from frugalrt.targets import passes
    from frugalrt.targets.importer import import_onnx
    from frugalrt.targets.registry import tvm_target

    target = tvm_target("host")
    mod = passes.optimize(import_onnx(digits_bn[2], target), target)
    with target:
        lowered = relax.get_pipeline("default")(mod)
    sizes = []

    def visit(e):
        if getattr(getattr(e, "op", None), "name", None) == "relax.vm.alloc_storage":
            shape = e.args[0]
            sizes.append([int(v) for v in shape.values] if isinstance(shape, relax.ShapeExpr) and all(
                isinstance(v, tvm.tirx.IntImm) for v in shape.values) else None)

    relax.analysis.post_order_visit(lowered["main"].body, visit)
    assert len(sizes) <= 3 and sizes.count(None) == 1, sizes  # the output's storage follows the batch
    # the butterfly's float32 output [batch, 256], then the first binary layer's packed sign bits [batch, 32]
    assert [s for s in sizes if s is not None] == [[passes.DEFAULT_BATCH_BOUND * 256 * 4],
                                                   [passes.DEFAULT_BATCH_BOUND * 32]], sizes


@pytest.mark.parametrize("batch", [1, 7, 40])
def test_digits_with_batchnorm_matches_pytorch_and_reference(digits_bn, digits_bn_host, batch):
    model, x, onnx_model = digits_bn
    x = torch.cat([x] * 6)[:batch]
    with torch.no_grad():
        want = model(x).numpy()
    got = frugalrt.load(digits_bn_host.path)(x.numpy())[0]
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)  # oracle: PyTorch (unfolded)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    # oracle: the reference kernels on the folded graph; only the final dense matmul's summation
    # order differs (frugal ops, BN folded into them and the Hardtanh are exact)
    np.testing.assert_allclose(got, _reference(onnx_model, x.numpy()), rtol=1e-6, atol=1e-6 * scale)


def test_manifest_records_the_batch_bound(digits_bn_host):
    from frugalrt.targets import passes

    assert json.loads((digits_bn_host.path / "manifest.json").read_text())["batch_bound"] == passes.DEFAULT_BATCH_BOUND


def _binary_cnn():
    return nn.Sequential(BinaryConv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(),
                         BinaryConv2d(8, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.Hardtanh(),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 10))


def _float_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         ButterflyLinear(4 * 8 * 8, 32), nn.BatchNorm1d(32), nn.ReLU6(), BinaryLinear(32, 10))


# (name, factory, input shape without batch): BatchNorms after binary, standard and butterfly layers
CNNS = [("binary cnn", _binary_cnn, (1, 8, 8)), ("conv + butterfly + binary", _float_cnn, (1, 8, 8))]


@pytest.mark.parametrize("name,make,shape", CNNS)
def test_cnn_with_batchnorm_compiles_without_it_and_matches(name, make, shape, tmp_path):
    from frugalrt.targets import passes
    from frugalrt.targets.importer import import_onnx
    from frugalrt.targets.registry import tvm_target

    torch.manual_seed(len(name))
    model, x = _randomize_bn(make()), torch.randn(6, *shape)
    onnx_model = _export(model, x, tmp_path / "m.onnx", fold_bn=False, pack_activations=False)
    target = tvm_target("host")
    assert _ops_in(passes.optimize(import_onnx(onnx_model, target), target))["relax.nn.batch_norm"] == 0
    artifact = frugalrt.compile(tmp_path / "m.onnx", "host", tmp_path / "host")
    with torch.no_grad():
        want = model(x).numpy()
    got = frugalrt.load(artifact.path)(x.numpy())[0]
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)  # oracle: PyTorch
    np.testing.assert_allclose(got, _reference(onnx_model, x.numpy()), rtol=1e-5, atol=1e-6 * scale)


# activation between frugal ops: (name, module, whether the compiler drops it before a binary op)
ACTIVATIONS = [("hardtanh", nn.Hardtanh, True), ("clip -2..0.5", lambda: nn.Hardtanh(-2, 0.5), True),
               ("relu6", nn.ReLU6, False), ("relu", nn.ReLU, False)]


@pytest.mark.parametrize("name,act,dropped", ACTIVATIONS)
def test_activation_after_frugal_ops(name, act, dropped, tmp_path):
    from frugalrt.targets import passes
    from frugalrt.targets.importer import import_onnx
    from frugalrt.targets.registry import tvm_target

    torch.manual_seed(len(name))
    model = nn.Sequential(ButterflyLinear(16, 32), act(), BinaryLinear(32, 24), act(), BinaryLinear(24, 8),
                          act()).eval()
    x = torch.randn(9, 16)
    onnx_model = _export(model, x, tmp_path / "m.onnx")
    target = tvm_target("host")
    mod = passes.optimize(import_onnx(onnx_model, target), target)
    kernels = _call_tirs(mod["main"])  # activations before binary ops dropped or fused, the others fused
    assert len(kernels) == 3 and all(k.startswith("frugalrt_") for k in kernels), kernels
    assert "packed" in kernels[1], kernels  # packed sign bits between the binary layers: an activation there
    fused = [k.rsplit("_", 1)[1] for k in kernels if k.endswith(("_relu", "_clip"))]  # is in the thresholds
    assert fused == (["clip"] if dropped else ["relu" if name == "relu" else "clip"] * 2), kernels
    artifact = frugalrt.compile(tmp_path / "m.onnx", "host", tmp_path / "host")
    with torch.no_grad():
        want = model(x).numpy()
    got = frugalrt.load(artifact.path)(x.numpy())[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())  # oracle: PyTorch
    # oracle: the reference kernels; binary outputs and the clips are exact, the butterfly may use FMAs
    np.testing.assert_array_equal(got, _reference(onnx_model, x.numpy()))


def test_batch_bound_option_and_batches_above_it(digits_bn, tmp_path):
    import tvm

    from frugalrt.errors import ArtifactError

    _, x, onnx_model = digits_bn
    onnx.save(onnx_model, tmp_path / "d.onnx")
    bounded = frugalrt.compile(tmp_path / "d.onnx", "host", tmp_path / "host", batch_bound=4)
    unbounded = frugalrt.compile(tmp_path / "d.onnx", "host", tmp_path / "none", batch_bound=0)
    assert json.loads((bounded.path / "manifest.json").read_text())["batch_bound"] == 4
    assert "batch_bound" not in json.loads((unbounded.path / "manifest.json").read_text())
    planned, dynamic = frugalrt.load(bounded.path), frugalrt.load(unbounded.path)
    xs = np.concatenate([x.numpy()] * 2)
    for batch in (1, 3, 4):
        np.testing.assert_array_equal(planned(xs[:batch])[0], dynamic(xs[:batch])[0])  # same kernels
    np.testing.assert_array_equal(dynamic(xs)[0][:4], planned(xs[:4])[0])
    with pytest.raises(ArtifactError, match=r"batch 5 exceeds the artifact's batch_bound 4 .*batch_bound=5\)"):
        planned(xs[:5])
    with pytest.raises(Exception, match="storage allocation failure"):  # TVM's own check, e.g. over RPC
        planned.vm["main"](tvm.runtime.tensor(xs[:5]))


def test_bound_is_lowered_for_large_activations():
    from frugalrt.export.exporter import to_onnx
    from frugalrt.targets import passes
    from frugalrt.targets.importer import import_onnx
    from frugalrt.targets.registry import tvm_target

    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    mod = import_onnx(to_onnx(model, (torch.randn(2, 3, 32, 32),)), tvm_target("host"))
    target = tvm_target("host")
    bound = passes.batch_bound_for(mod, target)  # [batch, 64, 32, 32] float32 intermediates: 256 KiB per row
    assert 1 <= bound <= passes.PLANNED_BYTES_MAX // (64 * 32 * 32 * 4) < passes.DEFAULT_BATCH_BOUND
    assert passes.planned_bytes(mod, target, passes.batch_var(mod["main"]), bound) <= passes.PLANNED_BYTES_MAX


def test_c_bundle_is_bit_identical_to_the_reference_on_the_folded_graph(tmp_path, run_bundle_natively):
    """The Cortex-M bundle of a frugal model with BatchNorms and a ReLU, built for this machine with
    gcc (no FMA contraction) and run natively: the folded BN and the fused ReLU leave one kernel per
    frugal op."""
    torch.manual_seed(5)
    model = _randomize_bn(nn.Sequential(ButterflyLinear(16, 32), nn.BatchNorm1d(32), nn.Hardtanh(),
                                        BinaryLinear(32, 24), nn.BatchNorm1d(24), nn.ReLU()))
    x = torch.randn(5, 16)
    onnx_model = _export(model, x, tmp_path / "m.onnx", fold_bn=False, pack_activations=False)
    artifact = frugalrt.compile(tmp_path / "m.onnx", "cortex-m4", tmp_path / "m4")
    bundle = artifact.lib_path
    assert json.loads((bundle / "plan.json").read_text())["num_steps"] == 2
    got = run_bundle_natively(bundle, x.numpy())
    np.testing.assert_array_equal(got, _reference(onnx_model, x.numpy()))  # oracle: reference kernels
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())  # oracle: PyTorch
    assert read_golden(onnx_model) is not None
