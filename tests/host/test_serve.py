import threading
import urllib.request
from pathlib import Path

import pytest

from mlcweb.serve import make_server


def test_serves_wasm_with_its_mime_type_on_loopback(tmp_path: Path) -> None:
    (tmp_path / "model.wasm").write_bytes(b"\0asm\1\0\0\0")
    (tmp_path / "tensor-cache.json").write_text("{}")
    server = make_server(tmp_path, port=0)
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/model.wasm", timeout=10) as resp:
            assert resp.headers["Content-Type"] == "application/wasm"
            assert resp.headers["Cache-Control"] == "no-cache"
            assert resp.read() == b"\0asm\1\0\0\0"
        with urllib.request.urlopen(f"{base}/tensor-cache.json", timeout=10) as resp:
            assert resp.headers["Content-Type"] == "application/json"
    finally:
        server.shutdown()
        server.server_close()


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build it first"):
        make_server(tmp_path / "nope")
