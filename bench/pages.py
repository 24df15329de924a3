"""The measurement pages in docs/: every bench writes its own page from its own output, so a rerun updates it.

A page is a title, the command line that wrote it with the machine it ran on (CPU, CPU count, load average
when it ended: above the CPU count, other work shared the machine), what it measures (the bench's own
prose, kept in the bench), and its tables. No commit hashes: the page is as current as its last run.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from typing import Any, Iterable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(prog: str, argv: Sequence[str] | None) -> str:
    """`Written by <command> on <machine>`: the line every page starts with. Where the outputs went (`--page`,
    `--out`) is left out: it says nothing of what was measured, and a rerun writes the page where it belongs."""
    given, kept = list(sys.argv[1:] if argv is None else argv), []
    while given:
        a = given.pop(0)
        if a in ("--page", "--out"):
            given = given[1:]
        elif not a.startswith(("--page=", "--out=")):
            kept.append(a)
    args = " ".join(shlex.quote(a) for a in kept)
    load = os.getloadavg()[0]
    return (f"Written by `python -m {prog}{' ' + args if args else ''}` on {cpu_model()} ({os.cpu_count()} CPUs; "
            f"load average {load:.1f} when it ended).")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return lines + [""]


def number(v: Any, digits: int = 2) -> str:
    """A figure as a page shows it: thousands separated, `digits` decimals below 1,000 (a test loss of 105.18
    nats keeps them), none above."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if not isinstance(v, (int, float)):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.{digits}f}"


def write(path: str, title: str, prog: str, argv: Sequence[str] | None, body: Sequence[str]) -> str:
    """Write the page (title, provenance, body lines) and return its text; prints where it went."""
    text = "\n".join([f"# {title}", "", provenance(prog, argv), "", *body]).rstrip() + "\n"
    with open(path, "w") as fh:
        fh.write(text)
    print(f"{prog}: wrote {path}", file=sys.stderr)
    return text
