"""The GPU schedule rules of mlcweb_passes: what they match, what schedule they make, and that it compiles.

Numerics on a GPU are checked end to end by ``benchmarks/sd_gpu.py`` (UNet and VAE against PyTorch).
"""

import re

import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp

CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})


@I.ir_module
class GroupNormSiLU:
    @R.function
    def main(
        x: R.Tensor((2, 64, 32, 32), "float32"), g: R.Tensor((64,), "float32"), b: R.Tensor((64,), "float32")
    ) -> R.Tensor((2, 64, 32, 32), "float16"):
        with R.dataflow():
            y = R.nn.group_norm(x, g, b, num_groups=32, channel_axis=1, axes=[2, 3])
            out = R.astype(R.multiply(y, R.sigmoid(y)), "float16")
            R.output(out)
        return out


@I.ir_module
class Attention:
    @R.function
    def main(q: R.Tensor((8, 256, 40), "float16"), k: R.Tensor((8, 40, 256), "float16")) -> R.Tensor(
        (8, 256, 256), "float16"
    ):
        with R.dataflow():
            s = R.astype(R.matmul(q, k, out_dtype="float32"), "float16")
            R.output(s)
        return s


def _kernel(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    with target:
        fused = mp.FuseOperators()(mod)
    funcs = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1
    return funcs[0]


def _launches(func: tvm.tirx.PrimFunc) -> list[int]:
    """Extents of the loops bound to blockIdx.x, in order: one per kernel of the function."""
    pattern = r'T\.thread_binding\(T\.int64\((\d+)\), thread="blockIdx\.x"\)'
    return [int(n) for n in re.findall(pattern, func.script())]


@pytest.mark.parametrize("kind", ["cuda", "webgpu"])
def test_group_norm_gets_a_block_per_row_then_a_thread_per_element(kind: str) -> None:
    target = CUDA if kind == "cuda" else tvm.target.Target({"kind": "webgpu"})
    func = _kernel(GroupNormSiLU, target)
    sch = mp.RowReduction().apply(func, target, False)
    assert sch is not None
    launches = _launches(sch.mod["main"])
    elements, threads = 2 * 64 * 32 * 32, 256
    assert sorted(launches) == [2 * 32, elements // threads]  # rows = batch x groups; then every element
    # dlight's rule, for comparison, has only the batch axis for thread blocks
    dlight = tvm.s_tir.dlight.gpu.GeneralReduction().apply(func, target, False)
    assert _launches(dlight.mod["main"]) == [2]


def test_row_reduction_leaves_matmuls_and_short_rows_to_other_rules() -> None:
    assert mp.RowReduction().apply(_kernel(Attention, CUDA), CUDA, False) is None
    short = mp.RowReduction(min_row_length=4096).apply(_kernel(GroupNormSiLU, CUDA), CUDA, False)
    assert short is None  # rows of 2 x 32 x 32 = 2048
    assert mp.RowReduction().apply(_kernel(GroupNormSiLU, CUDA), tvm.target.Target("llvm"), False) is None


def test_head_dim_40_matmul_goes_to_tensor_cores() -> None:
    func = _kernel(Attention, CUDA)
    plain = tvm.s_tir.dlight.gpu.Matmul().apply(func, CUDA, False)
    assert "wmma" not in plain.mod.script()  # dlight keeps K=40 on CUDA cores
    sch = mp.TensorCoreMatmul().apply(func, CUDA, False)
    assert sch is not None and "wmma.matrix_a" in sch.mod.script()
    assert mp.TensorCoreMatmul().apply(func, tvm.target.Target({"kind": "cuda", "arch": "sm_61"}), False) is None


def test_default_rules_compile_both_for_cuda() -> None:
    for mod in (GroupNormSiLU, Attention):
        exe = tvm.compile(mod, CUDA, relax_pipeline=mp.pipeline(CUDA))
        assert exe is not None
