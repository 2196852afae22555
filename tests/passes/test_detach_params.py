import numpy as np
import pytest
import torch
from testutil import import_torch
from tvm import relax
from tvm.script import relax as R

import mlcweb_passes as mp


class TwoLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(x)))


def _imported() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model = TwoLayer()
    return model, import_torch(model, [torch.randn(2, 8)])


def test_detach_returns_named_params_in_argument_order() -> None:
    model, mod = _imported()
    assert "params" in mod["main"].attrs  # before: the weights ride inside the module
    stripped, params = mp.detach_params(mod)
    assert "params" not in stripped["main"].attrs  # after: the module carries no tensors
    assert list(params) == ["p_encoder_weight", "p_encoder_bias", "p_head_weight", "p_head_bias"]
    arg_names = [p.name for p in stripped["main"].params[1:]]
    assert arg_names == list(params)
    state = model.state_dict()
    for name, value in params.items():
        torch_name = name[2:].replace("_", ".", 1)
        np.testing.assert_array_equal(value.numpy(), state[torch_name].numpy())


def test_names_are_stable_across_imports() -> None:
    _, first = _imported()
    _, second = _imported()
    assert list(mp.detach_params(first)[1]) == list(mp.detach_params(second)[1])


def test_module_without_params_attribute_is_a_clear_error() -> None:
    @R.function
    def main(x: R.Tensor((2,), "float32"), w: R.Tensor((2,), "float32")) -> R.Tensor((2,), "float32"):
        R.func_attr({"num_input": 1})
        return R.add(x, w)

    mod = relax.transform.Normalize()(__import__("tvm").IRModule({"main": main}))
    with pytest.raises(mp.ParamNameError, match="keep_params_as_input"):
        mp.detach_params(mod)


def test_duplicate_parameter_names_are_refused() -> None:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2,), "float32"))
    w1 = relax.Var("w", relax.TensorType((2,), "float32"))
    w2 = relax.Var("w", relax.TensorType((2,), "float32"))
    with bb.function("main", [x, w1, w2], attrs={"num_input": 1}):
        out = bb.emit(relax.op.add(relax.op.add(x, w1), w2))
        bb.emit_func_output(out)
    with pytest.raises(mp.ParamNameError, match="both named 'w'"):
        mp.param_names(bb.get()["main"])


def test_unique_param_names_suffixes_repeats_in_order() -> None:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2,), "float32"))
    ws = [relax.Var(n, relax.TensorType((2,), "float32")) for n in ("w", "b", "w", "w")]
    with bb.function("main", [x, *ws], attrs={"num_input": 1}):
        out = x
        for w in ws:
            out = bb.emit(relax.op.add(out, w))
        bb.emit_func_output(out)
    assert mp.unique_param_names(bb.get()["main"]) == ["w", "b", "w_1", "w_2"]
