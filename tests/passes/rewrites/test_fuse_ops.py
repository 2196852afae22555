import numpy as np
import tvm
from testutil import as_numpy, build, to_tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class MatmulBiasRelu:
    @R.function
    def main(
        x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 16), "float32"), b: R.Tensor((16,), "float32")
    ) -> R.Tensor((4, 16), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.add(y, b)
            out = R.nn.relu(z)
            R.output(out)
        return out


def test_fusion_merges_elementwise_consumers_into_one_kernel() -> None:
    legalized_only = relax.transform.LegalizeOps()(MatmulBiasRelu)
    assert mp.count_kernels(legalized_only) == 3  # before: matmul, add, relu
    fused = mp.FuseOperators()(MatmulBiasRelu)
    assert mp.count_kernels(fused) == 1  # after: one fused kernel
    calls = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(calls) == 1


def test_fused_kernel_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 8), dtype=np.float32)
    w = rng.standard_normal((8, 16), dtype=np.float32)
    b = rng.standard_normal(16, dtype=np.float32)
    got = as_numpy(build(MatmulBiasRelu)["main"](*to_tvm(x, w, b)))[0]
    np.testing.assert_allclose(got, np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-5)
