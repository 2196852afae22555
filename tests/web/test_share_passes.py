"""web/lib/mlcweb.js ``sharingPasses`` and ``cacheBindings``: tvmjs' dispatches in one compute pass, or
with their bind groups and uniforms reused, give the same numbers.

tvmjs opens a compute pass for every dispatch; ``streamCommands(ctx, every, { sharePasses: true })``
keeps one open across dispatches and ends it before copies and submissions. ``cacheBindings`` keeps a
uniform buffer per distinct argument bytes and each bind group by its layout and buffers. A chain of
dependent kernels (each reads what the one before wrote, with a copy to the host between submissions)
on SwiftShader, against numpy: any write not visible to the next dispatch, a pass left open at a copy,
or a bind group or uniform reused for the wrong arguments, shows.
"""

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class Chain:
    @R.function
    def main(x: R.Tensor((64, 64), "float32"), w: R.Tensor((64, 64), "float32")) -> R.Tensor((64, 64), "float32"):
        with R.dataflow():
            a = R.nn.softmax(R.matmul(x, w), axis=-1)
            b = R.nn.softmax(R.matmul(a, w), axis=-1)
            c = R.add(R.matmul(b, w), a)
            R.output(c)
        return c


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_one_pass_and_cached_bindings_match_numpy() -> None:
    from webgpu_node import WEBGPU, run_on_webgpu

    exe = tvm.compile(Chain, WEBGPU, relax_pipeline=mp.pipeline(WEBGPU))
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((64, 64)).astype(np.float32), rng.standard_normal((64, 64)).astype(np.float32)
    a = _softmax(x.astype(np.float64) @ w)
    want = _softmax(a @ w) @ w + a
    for options in ({}, {"share_passes": True}, {"cache_bindings": True}):
        got = run_on_webgpu(exe, "main", [x, w], **options)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
