"""Where a result came from: the commit of the jaxquant checkout that measured it.

Read from ``.git`` directly, with no subprocess: the command line's no-download guard forbids
child processes on its fast paths, and ``git`` may not be installed where jaxquant runs.
"""

from __future__ import annotations

import functools
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def head_commit() -> str | None:
    """The sha of the git checkout jaxquant runs from, read from ``.git`` (no subprocess);
    None for an installed package or an unreadable repository."""
    git = _ROOT / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        common = git / "commondir"
        root = (git / common.read_text().strip()).resolve() if common.is_file() else git
        for base in (git, root):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = root / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else ():
            if line.endswith(" " + ref):
                return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def worktree_dirty() -> bool | None:
    """Whether tracked files differ from ``HEAD`` (``git status``; None without git or outside
    a checkout). Spawns ``git``: for benchmarks, not for the command line's fast paths."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(_ROOT), "status", "--porcelain", "-uno"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() != ""


__all__ = ["head_commit", "worktree_dirty"]
