"""py-spy on the running server: where the CPU goes under warm Authenticate."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


def record(pids: list[int], seconds: float, tmp: Path, top: int = 25,
           native: bool = False) -> dict[str, Any]:
    """Samples the server (and its workers) for `seconds`; returns the top frames."""
    exe = py_spy()
    if exe is None:
        return {"error": "py-spy is not installed (pip install py-spy==0.4.3)"}
    out = tmp / f"profile-{time.monotonic_ns()}.txt"
    command = [exe, "record", "--pid", str(pids[0]), "--duration", str(int(seconds)),
               "--rate", "200", "--format", "raw", "--gil", "--output", str(out)]
    if len(pids) > 1:
        command.append("--subprocesses")
    # --native reads C frames too (grpc's Cython core), which needs the process paused
    # for each sample; Python frames alone are read without pausing it.
    command.append("--native" if native else "--nonblocking")
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not out.exists():
        return {"error": (done.stderr or done.stdout)[-500:]}
    return summarise(out.read_text().splitlines(), top)


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; with
    # --subprocesses each stack starts with 'process PID:"command line"', which
    # names paths of this machine: only the process's part is kept.
    if frame.startswith("process "):
        pid = frame.split(":", 1)[0].removeprefix("process ")
        child = "--reuse-port" in frame or " -c " in frame or "worker" in frame
        return f"process {pid} ({'a child' if child else 'the parent'})"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    marker = "site-packages/"
    if marker in path:
        path = path.split(marker, 1)[1]
    elif "service/" in path:
        path = path.split("service/", 1)[1]
    return f"{name} ({path})"


def summarise(lines: list[str], top: int = 25) -> dict[str, Any]:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";") if f]
        for name in set(frames):
            inclusive[name] += n
        if frames:
            own[frames[-1]] += n
    pct = (lambda c: round(100 * c / total, 1)) if total else (lambda c: 0.0)
    return {
        "samples": total,
        "inclusive_pct": {k: pct(v) for k, v in inclusive.most_common(top)},
        "self_pct": {k: pct(v) for k, v in own.most_common(top)},
    }


if __name__ == "__main__":
    import json

    print(json.dumps(summarise(Path(sys.argv[1]).read_text().splitlines()), indent=1))
