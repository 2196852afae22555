"""ApplyDatabase with a database made by a real (short) MetaSchedule tuning run on llvm."""

from pathlib import Path

import numpy as np
import pytest
import tvm
from testutil import as_numpy, to_tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp
from mlcweb.tune import detach_unnamed_tuning_log_handlers, preload_tensor_intrinsics

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


@I.ir_module
class Model:
    @R.function
    def main(
        x: R.Tensor((32, 64), "float32"), w: R.Tensor((64, 32), "float32"), b: R.Tensor((32,), "float32")
    ) -> R.Tensor((32, 32), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.add(y, b)
            out = R.exp(R.sum(z, axis=[1], keepdims=True) * R.const(0.01, "float32")) + z
            R.output(out)
        return out


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Tune only the matmul kernel, 4 trials: a real database with one workload in it."""
    work_dir = tmp_path_factory.mktemp("db")
    with TARGET:
        fused = mp.FuseOperators()(Model)
    tasks = ms.relax_integration.extract_tasks(fused, TARGET)
    (task,) = [t for t in tasks if "matmul" in t.task_name]
    preload_tensor_intrinsics()  # tune_tir's TuneContext imports it in this process too
    detach_unnamed_tuning_log_handlers()  # left by earlier tuning in the same pytest process
    ms.tune_tir(
        task.dispatched[0],
        TARGET,
        str(work_dir),
        max_trials_global=4,
        num_trials_per_iter=4,
        # Each builder worker imports tvm.s_tir.tensor_intrin: minutes on a busy 2-core machine unless
        # preloaded the fast way (see mlcweb.tune.preload_tensor_intrinsics).
        builder=ms.builder.LocalBuilder(max_workers=2, timeout_sec=600, initializer=preload_tensor_intrinsics),
        runner=ms.runner.LocalRunner(timeout_sec=60),
        seed=0,
    )
    return work_dir, task.task_name


def _lower(database: object) -> tvm.IRModule:
    passes = [mp.FuseOperators(), mp.ApplyDatabase(TARGET, database)]  # type: ignore[arg-type]
    with TARGET:
        return tvm.transform.Sequential(passes)(Model)


def test_tuned_function_uses_the_database_and_the_rest_falls_back(tuned_db: tuple[Path, str]) -> None:
    work_dir, task_name = tuned_db
    report = mp.schedule_report(_lower(work_dir))
    assert report.tuned == (task_name,)
    assert report.default and task_name not in report.default
    assert report.unscheduled == ()


def test_without_database_everything_falls_back() -> None:
    report = mp.schedule_report(_lower(None))
    assert report.tuned == ()
    assert len(report.default) >= 2


def test_tuned_build_matches_numpy(tuned_db: tuple[Path, str]) -> None:
    work_dir, _ = tuned_db
    exe = tvm.compile(Model, TARGET, relax_pipeline=mp.pipeline(TARGET, mp.PipelineOptions(database=work_dir)))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 64), dtype=np.float32)
    w = rng.standard_normal((64, 32), dtype=np.float32)
    b = rng.standard_normal(32, dtype=np.float32)
    got = as_numpy(relax.VirtualMachine(exe, tvm.cpu())["main"](*to_tvm(x, w, b)))[0]
    z = x @ w + b
    np.testing.assert_allclose(got, np.exp(z.sum(1, keepdims=True) * 0.01) + z, rtol=1e-4, atol=1e-4)


def test_missing_database_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"database_workload\.json"):
        mp.ApplyDatabase(TARGET, tmp_path / "nope")
