"""``mlcweb serve``: a local static server for an artifact directory or web bundle."""

from __future__ import annotations

import functools
import http.server
import logging
from pathlib import Path

__all__ = ["ArtifactRequestHandler", "make_server"]

log = logging.getLogger(__name__)

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


class ArtifactRequestHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with wasm's MIME type and cache headers.

    Weight shards and the library never change under one name within a build, but a rebuild replaces
    them, so everything is served with ``no-cache`` (revalidate by Last-Modified); the page keeps its
    own copy of the weights in the Cache API, checked against the manifest's hashes.
    """

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s - %s", self.address_string(), format % args)


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8000) -> http.server.ThreadingHTTPServer:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; build it first with `mlcweb build ... --out {root}`")
    handler = functools.partial(ArtifactRequestHandler, directory=str(root))
    return http.server.ThreadingHTTPServer((host, port), handler)
