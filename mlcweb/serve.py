"""``mlcweb serve``: a local static server for an artifact directory or web bundle.

It serves regular files inside the folder and nothing else: no directory listings (a folder's
``index.html`` instead, or 404), no symbolic links that lead out of the folder, only ``GET`` and ``HEAD``.
Single ``Range`` requests are answered with 206 (browsers resume weight downloads with them), and a
connection idle for :data:`IDLE_SECONDS` is closed. It binds the loopback address unless told otherwise,
and imports nothing heavy (no TVM), so it starts at once.
"""

from __future__ import annotations

import http.server
import ipaddress
import logging
import re
import urllib.parse
from pathlib import Path

__all__ = ["ArtifactRequestHandler", "is_loopback", "make_server"]

log = logging.getLogger(__name__)

IDLE_SECONDS = 30
MIME_TYPES = {
    ".wasm": "application/wasm",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".json": "application/json",
    ".bin": "application/octet-stream",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class ArtifactRequestHandler(http.server.BaseHTTPRequestHandler):
    """Regular files under :attr:`root`, with wasm's MIME type, no-cache and cross-origin isolation.

    Weight shards and the library never change under one name within a build, but a rebuild replaces
    them, so everything is served with ``no-cache``; the page keeps its own copy of the weights in the
    Cache API, checked against the manifest's hashes.
    """

    root: Path = Path(".")
    timeout = IDLE_SECONDS  # socket timeout: idle keep-alive connections are closed
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _resolve(self) -> Path | None:
        """The regular file the request names inside :attr:`root`, or None."""
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if "\0" in rel:
            return None
        base = self.root.resolve()
        path = (base / rel.lstrip("/")).resolve()
        if path != base and base not in path.parents:
            return None
        if path.is_dir():
            path = path / "index.html"
        return path if path.is_file() else None

    def _serve(self, send_body: bool) -> None:
        path = self._resolve()
        if path is None:
            self.send_error(404, "Not found")
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        status = 200
        if "Range" in self.headers:
            match = _RANGE.match(self.headers["Range"].strip())
            parsed = _byte_range(match, size) if match else None
            if parsed is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            (start, end), status = parsed, 206
        self.send_response(status)
        self.send_header("Content-Type", MIME_TYPES.get(path.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(end - start + 1 if size else 0))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if send_body and size:
            with path.open("rb") as f:
                f.seek(start)
                _copy(f, self.wfile, end - start + 1)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s - %s", self.address_string(), format % args)


def _byte_range(match: re.Match[str], size: int) -> tuple[int, int] | None:
    """``(first, last)`` of a single ``bytes=a-b`` range of a ``size``-byte file, or None if unsatisfiable."""
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # the last N bytes
        count = int(last)
        return (max(0, size - count), size - 1) if count and size else None
    lo = int(first)
    hi = min(int(last), size - 1) if last else size - 1
    return (lo, hi) if lo <= hi and lo < size else None


def _copy(source: object, sink: object, count: int) -> None:
    remaining = count
    while remaining:
        block = source.read(min(1 << 20, remaining))  # type: ignore[attr-defined]
        if not block:
            return
        sink.write(block)  # type: ignore[attr-defined]
        remaining -= len(block)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8000) -> http.server.ThreadingHTTPServer:
    """A threading server for ``root``; raises ``FileNotFoundError`` / ``OSError`` with the fix."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; build it first with `mlcweb build ... --out {root}`")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, not {port}")
    handler = type("Handler", (ArtifactRequestHandler,), {"root": root})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
