import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class Small:
    @R.function
    def main(x: R.Tensor((64, 64), "float32"), w: R.Tensor((64, 64), "float32")) -> R.Tensor((64, 64), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.nn.softmax(y, axis=-1)
            R.output(z)
        return z


def _scheduled(target: tvm.target.Target) -> tvm.IRModule:
    with target:
        return mp.DefaultSchedule(target)(mp.FuseOperators()(Small))


def test_cpu_schedule_runs_loops_in_parallel() -> None:
    target = tvm.target.Target("llvm")
    with target:
        before = mp.FuseOperators()(Small)
    funcs = [f for _, f in before.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert funcs and all("T.parallel" not in f.script() for f in funcs)
    after = _scheduled(target)
    report = mp.schedule_report(after)
    assert report.unscheduled == () and len(report.default) == len(funcs)
    for _, f in after.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc):
            assert "T.parallel" in f.script()


@pytest.mark.parametrize("kind", ["webgpu", "cuda"])
def test_gpu_schedule_binds_threads(kind: str) -> None:
    target = tvm.target.Target({"kind": kind})
    after = _scheduled(target)
    for _, f in after.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc):
            assert "threadIdx.x" in f.script()
    assert mp.schedule_report(after).unscheduled == ()


def test_unknown_target_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="no default schedule rules"):
        mp.default_rules(tvm.target.Target("c"))


def test_input_module_is_left_unchanged() -> None:
    # IRModule.__setitem__ edits in place; a pass must not reschedule the caller's module under it
    # (mlcweb tune measures a kernel's default schedule and then tunes the unscheduled original).
    target = tvm.target.Target("llvm")
    with target:
        fused = mp.FuseOperators()(Small)
        text = fused.script()
        mp.DefaultSchedule(target)(fused)
    assert fused.script() == text and mp.schedule_report(fused).default == ()
