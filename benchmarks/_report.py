"""The JSON report the CPU measurement scripts on the embedded model write (fixed_softmax_reach.py,
precision_error.py): their rows, and a `meta` block that says when, where and how they were made."""

from __future__ import annotations

import json
import platform
import sys
import time


def write_report(path: str, rows: list, t0: float, **meta) -> None:
    """Writes {"meta": meta + date, machine, argv and seconds since t0 (perf_counter), "rows": rows} to `path`."""
    meta = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        **meta,
        "argv": sys.argv,
        "seconds": time.perf_counter() - t0,
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
