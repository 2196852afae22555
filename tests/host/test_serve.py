import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
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


class _Served:
    def __init__(self, root: Path) -> None:
        self.server = make_server(root, port=0)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), b""

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[_Served]:
    root = tmp_path / "site"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<p>page</p>")
    (root / "params_shard_0.bin").write_bytes(bytes(range(100)))
    (root / "sub" / "data.json").write_text("{}")
    (tmp_path / "secret.txt").write_text("secret")
    (root / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (root / "etc").symlink_to("/etc")
    server = _Served(root)
    yield server
    server.close()


@pytest.mark.parametrize(
    "path", ["/leak.txt", "/etc/passwd", "/../secret.txt", "/%2e%2e/secret.txt", "/sub/", "/sub", "/nope.bin"]
)
def test_only_regular_files_inside_the_folder_are_served(served: _Served, path: str) -> None:
    status, _, body = served.get(path)
    assert status == 404 and b"secret" not in body and b"root:" not in body


def test_a_folder_gives_its_index_page_never_a_listing(served: _Served) -> None:
    status, headers, body = served.get("/")
    assert status == 200 and body == b"<p>page</p>" and headers["Content-Type"].startswith("text/html")


@pytest.mark.parametrize(
    ("header", "status", "content"),
    [
        ("bytes=10-19", 206, bytes(range(10, 20))),
        ("bytes=90-", 206, bytes(range(90, 100))),
        ("bytes=-5", 206, bytes(range(95, 100))),
        ("bytes=100-200", 416, b""),
        ("bytes=abc", 416, b""),
    ],
)
def test_range_requests(served: _Served, header: str, status: int, content: bytes) -> None:
    got, headers, body = served.get("/params_shard_0.bin", {"Range": header})
    assert got == status and body == content
    if status == 206:
        assert headers["Content-Range"].endswith("/100")


def test_idle_connections_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from mlcweb.serve import ArtifactRequestHandler

    monkeypatch.setattr(ArtifactRequestHandler, "timeout", 0.5)
    server = _Served(tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", server.server.server_address[1]), timeout=5) as sock:
            assert sock.recv(1) == b""  # the server hung up on a client that sent nothing
    finally:
        server.close()


def test_serve_warns_off_loopback_and_checks_the_port(tmp_path: Path) -> None:
    import subprocess
    import sys

    from mlcweb.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    result = subprocess.run(
        [sys.executable, "-m", "mlcweb.cli", "serve", str(tmp_path), "--port", "70000"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--port must be between 0 and 65535" in result.stderr


def test_serve_imports_no_tvm() -> None:
    import subprocess
    import sys

    code = "import sys, mlcweb.cli, mlcweb.serve; sys.exit('tvm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_serve_names_a_missing_folder(tmp_path: Path) -> None:
    """A folder that does not exist is what the one line says, not a port to change."""
    import subprocess
    import sys

    missing = tmp_path / "nothing-here"
    result = subprocess.run(
        [sys.executable, "-m", "mlcweb.cli", "serve", str(missing)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{missing} is not a directory" in result.stderr and "--port" not in result.stderr
