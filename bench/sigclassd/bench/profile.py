"""Profiling a system under test: py-spy from outside (else pyinstrument inside), summarised by function."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from sigclassd.bench.parties import die_with_parent


def py_spy() -> str | None:
    """py-spy next to this interpreter (a venv not on PATH) or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start_py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """Sample the SUT for ``seconds`` without pausing it (``--nonblocking``), as collapsed stacks.

    ``--idle`` keeps the samples of a thread that waits: the main loop waiting in
    ``poll`` (spare time) or on TensorFlow's worker threads (model time) would
    otherwise vanish from the profile.
    """
    return subprocess.Popen(
        [py_spy() or "py-spy", "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "100",
         "--nonblocking", "--idle", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,  # noqa: PLW1509 - Popen has no option for PR_SET_PDEATHSIG
    )


def pyinstrument_wrap(profile: Path) -> list[str]:
    """Without py-spy: run the SUT under pyinstrument (whole life, main thread), text to ``profile``."""
    return [sys.executable, "-m", "pyinstrument", "--renderer", "text", "--outfile", str(profile)]


_LINE = re.compile(r":\d+\)$")


def summarise_folded(lines: Sequence[str], top: int = 25) -> str:
    """Top functions by self and by inclusive samples from py-spy's collapsed stacks (``frame;frame count``).

    Frames are merged per function (``name (file:line)`` -> ``name (file)``):
    a hot function spread over many lines should rank as one. Stacks of other
    Python threads (rooted in ``Thread._bootstrap``: the metrics listener, a
    reload) are left out, so that percentages are of the main loop's time.
    """
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        if frames[0].startswith("Thread._bootstrap ("):
            continue
        k = int(count)
        total += k
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + k
    out = [f"samples: {total} (main thread)", "", "self %   frame"]
    total = max(total, 1)
    out += [f"{100 * v / total:6.1f}   {f}" for f, v in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", "total %  frame"]
    out += [f"{100 * v / total:6.1f}   {f}" for f, v in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(out) + "\n"


def summarise_profile(folded: Path, out: Path, title: str) -> None:
    if not folded.exists():
        out.write_text(f"{title}: py-spy wrote no profile\n")
        return
    out.write_text(f"py-spy, {title}, top frames (raw stacks: {folded.name})\n\n"
                   + summarise_folded(folded.read_text().splitlines()))
