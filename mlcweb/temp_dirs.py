"""Temporary folders named after the process that writes them, so a later run can remove what a killed
one left behind (and never what a running one is writing)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["make_temp_dir", "remove_stale"]

log = logging.getLogger(__name__)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new folder ``parent/<prefix><pid>-<random>``, readable by others (web servers, other users)."""
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    path.chmod(0o755)
    return path


def remove_stale(parent: Path, prefix: str) -> None:
    """Remove ``parent/<prefix><pid>-*`` folders whose process is gone."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    for leftover in parent.glob(f"{glob_escape(prefix)}*") if parent.is_dir() else []:
        match = pattern.match(leftover.name)
        if match and not _alive(int(match.group(1))):
            log.info("removing %s, left by a run that did not finish", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
