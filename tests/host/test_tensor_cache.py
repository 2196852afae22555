import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm.contrib import tvmjs

from mlcweb.errors import CorruptArtifactError
from mlcweb.tensor_cache import INDEX_FILE, read_tensor_cache, write_tensor_cache


def _params() -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return OrderedDict(
        [
            ("unet/conv.weight", rng.standard_normal((64, 32, 3, 3)).astype("float32")),
            ("unet/conv.bias", rng.standard_normal(64).astype("float16")),
            ("clip/position_ids", np.arange(77, dtype="int32")),
            ("vae/big", rng.standard_normal((300_000,)).astype("float32")),  # 1.2 MB: its own shard at 1 MB
        ]
    )


def test_raw_round_trip_is_exact_and_sharded(tmp_path: Path) -> None:
    params = _params()
    files = write_tensor_cache(params, tmp_path, shard_mb=1)
    assert files[0] == INDEX_FILE and len(files) >= 3  # index + at least two shards
    got, _ = read_tensor_cache(tmp_path)
    assert list(got) == list(params)
    for name, value in params.items():
        assert str(got[name].dtype) == str(value.dtype)
        np.testing.assert_array_equal(got[name].numpy(), value)


def test_tvm_reader_reads_our_cache(tmp_path: Path) -> None:
    params = _params()
    write_tensor_cache(params, tmp_path, shard_mb=1)
    got, _ = tvmjs.load_tensor_cache(str(tmp_path), tvm.cpu())
    for name, value in params.items():
        np.testing.assert_array_equal(got[name].numpy(), value)


def test_bf16_encoding_halves_float32_within_bf16_precision(tmp_path: Path) -> None:
    params = _params()
    write_tensor_cache(params, tmp_path / "raw")
    write_tensor_cache(params, tmp_path / "bf16", encoding="f32-to-bf16")
    raw_size = sum(p.stat().st_size for p in (tmp_path / "raw").glob("*.bin"))
    bf16_size = sum(p.stat().st_size for p in (tmp_path / "bf16").glob("*.bin"))
    assert bf16_size < 0.55 * raw_size
    got, _ = read_tensor_cache(tmp_path / "bf16")
    w = params["unet/conv.weight"]
    np.testing.assert_allclose(got["unet/conv.weight"].numpy(), w, rtol=2**-8, atol=0)  # 8-bit mantissa
    np.testing.assert_array_equal(got["clip/position_ids"].numpy(), params["clip/position_ids"])
    tvm_got, _ = tvmjs.load_tensor_cache(str(tmp_path / "bf16"), tvm.cpu())  # and TVM decodes it alike
    np.testing.assert_array_equal(tvm_got["unet/conv.weight"].numpy(), got["unet/conv.weight"].numpy())


def test_writing_twice_gives_identical_bytes(tmp_path: Path) -> None:
    write_tensor_cache(_params(), tmp_path / "a", shard_mb=1)
    write_tensor_cache(_params(), tmp_path / "b", shard_mb=1)
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def test_truncated_shard_is_a_clear_error(tmp_path: Path) -> None:
    write_tensor_cache(_params(), tmp_path, shard_mb=1)
    shard = tmp_path / "params_shard_0.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CorruptArtifactError, match="truncated"):
        read_tensor_cache(tmp_path)


def test_missing_shard_and_bad_index_are_clear_errors(tmp_path: Path) -> None:
    write_tensor_cache(_params(), tmp_path, shard_mb=1)
    (tmp_path / "params_shard_1.bin").unlink()
    with pytest.raises(CorruptArtifactError, match=r"params_shard_1\.bin is missing"):
        read_tensor_cache(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(CorruptArtifactError, match="not valid JSON"):
        read_tensor_cache(tmp_path)


def test_index_records_layout(tmp_path: Path) -> None:
    write_tensor_cache(_params(), tmp_path, shard_mb=1)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    rec = index["records"][0]
    assert rec["format"] == "raw-shard" and rec["dataPath"] == "params_shard_0.bin"
    assert {"name", "shape", "dtype", "format", "nbytes", "byteOffset"} <= set(rec["records"][0])


def test_weights_share_one_aligned_allocation_that_kernels_accept(tmp_path: Path) -> None:
    import gc

    from tvm.script import tirx as T

    from mlcweb.packed_tensors import ALIGNMENT

    write_tensor_cache(_params(), tmp_path, shard_mb=1)
    got, _ = read_tensor_cache(tmp_path)
    starts = sorted(t.data_ptr() for t in got.values())
    assert all((p - starts[0]) % ALIGNMENT == 0 for p in starts) and starts[0] % 64 == 0
    span = starts[-1] + got["vae/big"].numpy().nbytes - starts[0]
    assert span < sum(t.numpy().nbytes for t in got.values()) + len(got) * ALIGNMENT  # contiguous, not scattered

    @T.prim_func
    def double(a: T.Buffer((64,), "float16"), b: T.Buffer((64,), "float16")) -> None:
        for i in range(64):
            b[i] = a[i] * T.float16(2)

    kernel = tvm.compile(tvm.IRModule({"main": double}), "llvm")  # rejects tensors with a byte_offset
    bias = got.pop("unet/conv.bias")
    del got
    gc.collect()  # the other tensors are gone; the allocation stays while bias lives
    out = tvm.runtime.empty((64,), "float16", tvm.cpu())
    kernel["main"](bias, out)
    np.testing.assert_array_equal(out.numpy(), _params()["unet/conv.bias"] * 2)
