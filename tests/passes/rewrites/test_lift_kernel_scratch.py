import numpy as np
import tvm
from testutil import as_numpy
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import mlcweb_passes as mp


@I.ir_module
class RowMeans:
    """A PrimFunc as a two-kernel schedule leaves it: row sums go through a global buffer allocated in
    its root block (the runtime's workspace pool provides it on every call) to the loop that scales."""

    @T.prim_func(s_tir=True)
    def scale_by_mean(x: T.Buffer((4, 8), "float32"), y: T.Buffer((4, 8), "float32")):
        T.func_attr({"tirx.noalias": True})
        sums = T.sblock_alloc_buffer((4,), "float32")
        for i, k in T.grid(4, 8):
            with T.sblock("sums"):
                vi, vk = T.axis.remap("SR", [i, k])
                with T.init():
                    sums[vi] = T.float32(0)
                sums[vi] = sums[vi] + x[vi, vk]
        for i, j in T.grid(4, 8):
            with T.sblock("scale"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = x[vi, vj] * sums[vi] * T.float32(0.125)

    @R.function
    def main(x: R.Tensor((4, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        cls = RowMeans
        with R.dataflow():
            y = R.call_tir(cls.scale_by_mean, (x,), out_ty=R.Tensor((4, 8), "float32"))
            R.output(y)
        return y


@I.ir_module
class RowMeansLifted:
    """The same after LiftKernelScratch: the buffer is an output parameter the caller allocates."""

    @T.prim_func(s_tir=True)
    def scale_by_mean(x: T.Buffer((4, 8), "float32"), y: T.Buffer((4, 8), "float32"), sums: T.Buffer((4,), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i, k in T.grid(4, 8):
            with T.sblock("sums"):
                vi, vk = T.axis.remap("SR", [i, k])
                with T.init():
                    sums[vi] = T.float32(0)
                sums[vi] = sums[vi] + x[vi, vk]
        for i, j in T.grid(4, 8):
            with T.sblock("scale"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = x[vi, vj] * sums[vi] * T.float32(0.125)

    @R.function
    def main(x: R.Tensor((4, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        cls = RowMeansLifted
        with R.dataflow():
            both = R.call_tir(cls.scale_by_mean, (x,), out_ty=[R.Tensor((4, 8), "float32"), R.Tensor((4,), "float32")])
            y = both[0]
            R.output(y)
        return y


def test_global_scratch_becomes_an_extra_output_of_the_call() -> None:
    lifted = mp.LiftKernelScratch()(RowMeans)
    tvm.ir.assert_structural_equal(lifted, RowMeansLifted)


def test_lifted_module_computes_the_same() -> None:
    x = np.random.default_rng(0).standard_normal((4, 8)).astype("float32")
    expected = x * x.sum(axis=1, keepdims=True) / 8
    for mod in (RowMeans, mp.LiftKernelScratch()(RowMeans)):
        exe = tvm.compile(mod, "llvm")
        got = as_numpy(tvm.relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(x)))[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_modules_without_global_scratch_are_returned_unchanged() -> None:
    lifted = mp.LiftKernelScratch()(RowMeansLifted)
    assert lifted.same_as(RowMeansLifted)


def test_cuda_pipeline_leaves_no_workspace_allocation_in_the_host_code() -> None:
    """After the pipeline, the NHWC group norm's three kernels pass their statistics through tensors the
    Relax VM allocates: the compiled host code never asks the workspace pool (whose pages CUDA graphs
    would capture) for memory."""
    from test_gpu_rules import CUDA, GroupNormNHWC

    exe = tvm.compile(GroupNormNHWC, CUDA, relax_pipeline=mp.pipeline(CUDA))
    host = exe.mod.imports[0].inspect_source("ll")
    assert "TVMBackendAllocWorkspace" not in host
    unlifted = tvm.compile(GroupNormNHWC, CUDA, relax_pipeline=_without_lift(CUDA))
    assert "TVMBackendAllocWorkspace" in unlifted.mod.imports[0].inspect_source("ll")


def _without_lift(target: tvm.target.Target) -> tvm.transform.Pass:
    """The pipeline with its schedule phase replaced by one that schedules and lifts nothing."""
    phases = mp.phases(target)
    phases["schedule"] = tvm.transform.Sequential([mp.ApplyDatabase(target)])

    @tvm.transform.module_pass(opt_level=0)
    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(list(phases.values()))(mod)

    return run


def test_kernels_used_other_than_by_call_tir_keep_their_signature() -> None:
    """The kernel called through ``call_tir_inplace``, which this pass does not rewrite: its PrimFunc keeps
    its signature and its scratch."""
    bb = tvm.relax.BlockBuilder()
    x = tvm.relax.Var("x", tvm.relax.TensorType((4, 8), "float32"))
    y = tvm.relax.Var("y", tvm.relax.TensorType((4, 8), "float32"))
    kernel = bb.add_func(RowMeans["scale_by_mean"], "scale_by_mean")
    with bb.function("main", [x, y]):
        with bb.dataflow():
            z = bb.emit_output(tvm.relax.call_tir_inplace(kernel, [x, y], [1], tvm.relax.TensorType((4, 8), "float32")))
        bb.emit_func_output(z)
    in_place = bb.get()
    assert mp.LiftKernelScratch()(in_place).same_as(in_place)
