import numpy as np
import tvm
from testutil import as_numpy, build, composite_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp
from mlcweb_passes.rewrites.fuse_softmax import SOFTMAX_COMPOSITE


@I.ir_module
class CastSoftmaxCast:
    """What mixed precision makes of attention probabilities: float16 scores, float32 softmax, float16 out."""

    @R.function
    def main(s: R.Tensor((4, 16, 16), "float16")) -> R.Tensor((4, 16, 16), "float16"):
        with R.dataflow():
            x = R.astype(R.reshape(s, R.shape([2, 2, 16, 16])), "float32")
            p = R.nn.softmax(x, axis=-1)
            out = R.astype(R.reshape(p, R.shape([4, 16, 16])), "float16")
            R.output(out)
        return out


def _compute_kernels(mod: tvm.IRModule) -> list[str]:
    """PrimFuncs other than plain reshapes (those become views: ``RewriteDataflowReshape``)."""
    return [
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and not gv.name_hint.startswith("reshape")
    ]


def test_casts_join_the_softmax_kernel() -> None:
    fused = mp.FuseSoftmax()(CastSoftmaxCast)
    assert composite_names(fused) == [SOFTMAX_COMPOSITE]
    assert len(_compute_kernels(mp.FuseOperators()(CastSoftmaxCast))) >= 2  # FuseOps leaves the first cast alone
    assert len(_compute_kernels(mp.FuseOperators()(fused))) == 1


def test_fused_softmax_matches_numpy() -> None:
    s = (np.random.default_rng(1).standard_normal((4, 16, 16)) * 3).astype(np.float16)
    got = as_numpy(build(CastSoftmaxCast)["main"](*to_tvm(s)))[0]
    x = s.astype(np.float32)
    e = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(got.astype(np.float32), e / e.sum(-1, keepdims=True), rtol=2e-3, atol=1e-3)
