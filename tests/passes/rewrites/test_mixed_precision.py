import numpy as np
import torch
from testutil import as_numpy, build, import_torch, to_tvm
from tvm import relax

import mlcweb_passes as mp


class ConvMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 32, 3, padding=1)
        self.norm = torch.nn.GroupNorm(8, 32)
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv(x)))  # (1, 32, 8, 8)
        h = h.flatten(2).transpose(1, 2)  # (1, 64, 32)
        return torch.softmax(self.fc2(torch.nn.functional.gelu(self.fc1(h))), dim=-1)


def _calls(mod: object, op: str) -> list[relax.Call]:
    found: list[relax.Call] = []

    def visit(e: relax.Expr) -> None:
        if isinstance(e, relax.Call) and isinstance(e.op, __import__("tvm").ir.Op) and e.op.name == op:
            found.append(e)

    relax.analysis.post_order_visit(mod["main"].body, visit)  # type: ignore[index]
    return found


def _setup() -> tuple[torch.nn.Module, torch.Tensor, object, dict[str, object]]:
    torch.manual_seed(0)
    model = ConvMLP().eval()
    x = torch.randn(1, 4, 8, 8)
    mod, params = mp.detach_params(import_torch(model, [x]))
    return model, x, mod, params


def test_matmul_and_conv_compute_in_float16_with_float32_accumulation() -> None:
    _, _, mod, _ = _setup()
    assert all(str(c.ty.dtype) == "float32" for c in _calls(mod, "relax.matmul"))
    converted = mp.MixedPrecision("float32")(mod)
    matmuls = _calls(converted, "relax.matmul") + _calls(converted, "relax.nn.conv2d")
    assert matmuls
    for call in matmuls:
        assert {str(a.ty.dtype) for a in call.args} == {"float16"}  # float16 inputs
        assert str(call.ty.dtype) == "float32"  # float32 accumulator
    softmax = _calls(converted, "relax.nn.softmax")
    assert softmax and str(softmax[0].args[0].ty.dtype) == "float32"  # reductions stay float32


def test_lifted_weights_are_stored_in_float16() -> None:
    _, _, mod, _ = _setup()
    lifted = mp.split_transform_params(mp.MixedPrecision()(mod))
    weight_dtypes = [str(a.ty.dtype) for a in lifted.deploy["main"].params[1:]]
    assert weight_dtypes.count("float16") >= 3  # conv, fc1, fc2 weights


def test_float16_numerics_within_tolerance() -> None:
    model, x, mod, params = _setup()
    expected = model(x).detach().numpy()
    lifted = mp.split_transform_params(mp.MixedPrecision()(mod))
    deploy = mp.apply_transform_params(lifted.transform, params)  # type: ignore[arg-type]
    got = as_numpy(build(lifted.deploy)["main"](*to_tvm(x), *deploy))[0]
    # float16 has an 11-bit mantissa: relative error ~1e-3 per op; softmax outputs are in [0, 1].
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-3)
    assert np.abs(got - expected).max() > 0  # it really ran in reduced precision


def test_a_function_marked_keep_float32_is_left_alone() -> None:
    """Before: two copies of the model; after: the unmarked one computes in float16, the one carrying
    KEEP_FLOAT32_ATTR is structurally unchanged and gives the float32 result exactly."""
    import tvm

    model, x, mod, params = _setup()
    main = mod["main"]  # type: ignore[index]
    both = tvm.IRModule(
        {"half": main.with_attr("global_symbol", "half"), "full": main.with_attr(mp.KEEP_FLOAT32_ATTR, True)}
    )
    converted = mp.MixedPrecision()(both)
    tvm.ir.assert_structural_equal(converted["full"], both["full"])
    half = _calls(tvm.IRModule({"main": converted["half"]}), "relax.matmul")
    assert half and {str(a.ty.dtype) for c in half for a in c.args} == {"float16"}
    full = tvm.IRModule({"main": converted["full"].without_attr(mp.KEEP_FLOAT32_ATTR)})
    got = as_numpy(build(full)["main"](*to_tvm(x), *params.values()))[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
