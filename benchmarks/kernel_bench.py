"""What the kernel benchmarks (``flash_attention.py``, ``split_k.py``, ``skinny_matmul.py``,
``group_norm.py``) share: the CUDA-event timer, their common options, the loop that measures each case
and rewrites the JSON and Markdown after every row (a run cut short still leaves its table), and a
``main`` for those that measure one row per entry of a shape table."""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import tvm


def time_ms(fn: Callable[[], Any], number: int, repeat: int) -> float:
    """Median over ``repeat`` timings of ``number`` back-to-back calls of ``fn``, ms per call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / number)
    return statistics.median(times)


def parser(doc: str | None, stem: str, number: int) -> argparse.ArgumentParser:
    """The options every kernel benchmark takes; scripts add their own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, required=True, help=f"folder for {stem}.json / .md")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--number", type=int, default=number, help="calls per timing")
    p.add_argument("--repeat", type=int, default=10, help="timings per median")
    p.add_argument("--atol", type=float, default=2e-2, help="max abs error allowed against float32")
    return p


def record_cases(
    args: argparse.Namespace,
    stem: str,
    cases: Iterable[tuple[dict[str, Any], Callable[[], dict[str, Any]]]],
    markdown: Callable[[dict[str, Any]], str],
) -> int:
    """Measure each case (its error-row fields, its measuring function) into ``<stem>.json`` and
    ``<stem>.md`` under ``args.results``; 0 when every row is ``ok``."""
    record: dict[str, Any] = {"device": torch.cuda.get_device_name(), "arch": args.arch, "rows": []}
    args.results.mkdir(parents=True, exist_ok=True)
    for fields, measure in cases:
        try:
            row = measure()
        except Exception as exc:
            row = {**fields, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(row), flush=True)
        record["rows"].append(row)
        (args.results / f"{stem}.json").write_text(json.dumps(record, indent=1))
        (args.results / f"{stem}.md").write_text(markdown(record))
    return 0 if all(r.get("ok") for r in record["rows"]) else 1


def main(
    doc: str | None,
    stem: str,
    number: int,
    shapes: Iterable[tuple[Any, ...]],
    run_shape: Callable[[tuple[Any, ...], tvm.target.Target, argparse.Namespace], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse the common options (and the script's own, ``options``), then measure ``run_shape(spec,
    target, args)`` for each spec of ``shapes``, named by its first field; see :func:`record_cases`."""
    p = parser(doc, stem, number)
    if options is not None:
        options(p)
    args = p.parse_args()
    target = tvm.target.Target({"kind": "cuda", "arch": args.arch})
    cases = [({"name": spec[0]}, functools.partial(run_shape, spec, target, args)) for spec in shapes]
    return record_cases(args, stem, cases, markdown)
