from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class Chain:
    @R.function
    def main(x: R.Tensor((16, 16), "float32")) -> R.Tensor((16, 16), "float32"):
        with R.dataflow():
            a = R.exp(x)
            b = R.exp(a)
            c = R.exp(b)
            d = R.exp(c)
            R.output(d)
        return d


def _lowered(mod: object) -> object:
    # Legalize without fusion so each exp stays its own call and allocation.
    return relax.transform.LegalizeOps()(mod)


def test_chain_reuses_storage_as_computed_by_hand() -> None:
    # a, b, c are 16*16*4 = 1024-byte intermediates; a dies when c is made, so a and c share one
    # block and b has the other: two 1024-byte blocks. d is the output and escapes the function.
    planned = mp.StaticMemoryPlan()(_lowered(Chain))
    report = mp.memory_report(planned)["main"]
    assert report.storages == 2
    assert report.planned_bytes == 2048
    assert report.largest_bytes == 1024
    assert report.unplanned == 1


def test_without_planning_every_tensor_is_its_own_allocation() -> None:
    from tvm.relax import transform as T

    unplanned = T.CallTIRRewrite()(T.RemovePurityChecking()(T.ToNonDataflow()(_lowered(Chain))))
    report = mp.memory_report(unplanned)["main"]
    assert report.storages == 0
    assert report.unplanned == 4
