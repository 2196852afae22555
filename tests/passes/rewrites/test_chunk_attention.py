"""ChunkAttentionRows: an attention whose score matrix is over the bound runs in query-row chunks (each
chunk's scores a fraction of the whole), with the same result."""

import numpy as np
import pytest
from testutil import as_numpy, build, op_names, to_tvm
from tvm.script import ir as I
from tvm.script import relax as R

import mlcweb_passes as mp


@I.ir_module
class Attention:
    """SD's self-attention as torch.export leaves it after MixedPrecision: float16 operands, scores cast
    to float32 for the softmax, scaled; 2 x 2 heads of 64 tokens (scores 64 KiB in float32)."""

    @R.function
    def main(
        q: R.Tensor((4, 64, 8), "float16"), k: R.Tensor((4, 8, 64), "float16"), v: R.Tensor((4, 64, 8), "float16")
    ) -> R.Tensor((4, 64, 8), "float16"):
        with R.dataflow():
            s = R.matmul(q, k, out_dtype="float32")
            scaled = R.multiply(s, R.const(0.35, "float32"))
            p = R.astype(R.nn.softmax(scaled, axis=-1), "float16")
            out = R.matmul(p, v, out_dtype="float16")
            R.output(out)
        return out


def test_large_scores_run_in_chunks_with_the_same_result() -> None:
    after = mp.ChunkAttentionRows(max_bytes=16 * 1024)(Attention)  # 64 KiB of scores: 4 chunks of 16 rows
    names = op_names(after)
    assert names.count("relax.nn.softmax") == 4 and names.count("relax.strided_slice") == 4
    assert names[-1] == "relax.concat"
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float16) for s in ((4, 64, 8), (4, 8, 64), (4, 64, 8)))
    want = as_numpy(build(Attention)["main"](*to_tvm(q, k, v)))[0]
    got = as_numpy(build(after)["main"](*to_tvm(q, k, v)))[0]
    np.testing.assert_array_equal(got, want)  # each row's arithmetic is unchanged


def test_small_scores_and_other_graphs_are_left_alone() -> None:
    assert op_names(mp.ChunkAttentionRows()(Attention)) == op_names(Attention)  # 64 KiB < 256 MiB
    with pytest.raises(ValueError, match="positive"):
        mp.ChunkAttentionRows(max_bytes=0)


def test_the_webgpu_pipeline_keeps_sd15_scores_under_its_bound() -> None:
    import tvm
    from tvm import relax

    big = relax.BlockBuilder()
    q, k, v = (
        relax.Var(n, relax.TensorType(s, "float32"))
        for n, s in (("q", (16, 4096, 40)), ("k", (16, 40, 4096)), ("v", (16, 4096, 40)))
    )
    with big.function("main", [q, k, v]):
        with big.dataflow():
            p = big.emit(relax.op.nn.softmax(relax.op.matmul(q, k)))
            out = big.emit_output(big.emit(relax.op.matmul(p, v)))
        big.emit_func_output(out)
    target = tvm.target.Target("webgpu")
    with target:
        graph = mp.phases(target, mp.PipelineOptions())["graph"](big.get())
    assert op_names(graph).count("relax.nn.softmax") == 4  # 1 GiB of float32 scores in 256 MiB chunks
