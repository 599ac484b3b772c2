"""Which code a run ran: recorded in every run's metrics.jsonl and checkpoint, so that a results table never
averages seeds of different code silently (`sp table` refuses that unless asked, stages/report.py)."""
from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "stages", "store", "pipeline")  # the Python code a run executes


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code_version() -> dict:
    """{'source': sha256 (12 hex digits) of the package's Python files (paths and contents), 'commit': the git
    commit of the checkout or None outside one, 'dirty': whether tracked files differ from it (None outside git)}.

    'source' is what identifies the code in a table: it changes with any edit of the code a run executes and
    not with documentation or experiment files, and it exists for an installed copy without git too."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"source": digest.hexdigest()[:12], "commit": commit, "dirty": None if status is None else bool(status)}
