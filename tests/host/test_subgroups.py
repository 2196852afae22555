"""The webgpu subgroup library: reductions through WGSL subgroup operations, and the build's second
library, which the page loads only where the adapter's subgroups are as wide as it was built for."""

from __future__ import annotations

import pytest
import tvm
from tvm import relax

import mlcweb_passes as mp
from mlcweb.errors import MlcwebError
from mlcweb.targets import TARGETS, with_subgroups
from mlcweb.wgsl_check import check_wgsl, wgsl_sources


def _norms(output: int) -> tvm.IRModule:
    """Softmax plus layer norm (``output`` 0) or an NHWC group norm (ChannelsLastNorm's shape, 1)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((96, 200), "float32"))
    img = relax.Var("img", relax.TensorType((1, 32, 32, 64), "float32"))
    g, b = relax.Var("g", relax.TensorType((200,), "float32")), relax.Var("b", relax.TensorType((200,), "float32"))
    gc, bc = relax.Var("gc", relax.TensorType((64,), "float32")), relax.Var("bc", relax.TensorType((64,), "float32"))
    with bb.function("main", [x, g, b, img, gc, bc]):
        with bb.dataflow():
            if output == 0:
                y = relax.op.add(relax.op.nn.softmax(x), relax.op.nn.layer_norm(x, g, b, axes=[-1]))
            else:
                y = relax.op.nn.group_norm(img, gc, bc, num_groups=8, channel_axis=3, axes=[1, 2])
            out = bb.emit_output(bb.emit(y))
        bb.emit_func_output(out)
    return bb.get()


def test_subgroup_target_is_validated() -> None:
    target = with_subgroups(TARGETS["webgpu"], 32).tvm_target()
    assert bool(target.attrs["supports_subgroups"]) and int(target.attrs["thread_warp_size"]) == 32
    with pytest.raises(MlcwebError, match="subgroup size 16 is not one TVM builds"):
        with_subgroups(TARGETS["webgpu"], 16)
    with pytest.raises(MlcwebError, match="not 'llvm'"):
        with_subgroups(TARGETS["llvm"], 32)


def test_subgroup_library_kernels_reduce_through_subgroups_and_compile_on_dawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Softmax, layer norm and group norm reduce with subgroup shuffles in the subgroup target's WGSL, and
    Dawn compiles it. Their numbers need 32-wide subgroups (SwiftShader's are 4 wide, so the page loads the
    portable library there): benchmarks/sd_webgpu.py compares the subgroup library's outputs with the
    portable float32 build's on a GPU."""
    monkeypatch.setenv("MLCWEB_WGSL_CHECK", "require")
    target = with_subgroups(TARGETS["webgpu"], 32).tvm_target()
    for output in (0, 1):
        exe = tvm.compile(_norms(output), target, relax_pipeline=mp.pipeline(target))
        sources = wgsl_sources(exe.mod)
        shuffled = [name for name, code in sources.items() if "subgroupShuffle" in code]
        assert shuffled and all("enable subgroups;" in sources[name] for name in shuffled)
        assert check_wgsl(exe.mod, float16=False) == len(sources)
