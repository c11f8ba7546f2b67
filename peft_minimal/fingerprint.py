"""A short fingerprint of the ``peft_minimal`` source, to tell stale notebook outputs.

The first cell of every chapter prints it; ``tests/test_fingerprint.py`` fails when the
fingerprint stored in a chapter differs from the code's (``make refresh`` re-runs them).
It depends on the package's ``.py`` files only, by path inside the package and content, with
line endings normalised: the same on any machine, clone, checkout time or operating system.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def source_fingerprint(package_dir: str | Path = PACKAGE_DIR, length: int = 12) -> str:
    """The first ``length`` hex digits of the sha256 of every ``.py`` file under ``package_dir``,
    taken in sorted order of their paths (relative, ``/``-separated), with CRLF and CR read as LF."""
    root = Path(package_dir)
    digest = hashlib.sha256()
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")
                   if "__pycache__" not in p.relative_to(root).parts)
    for relative, path in files:
        text = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        digest.update(relative.encode() + b"\0" + str(len(text)).encode() + b"\0" + text)
    return digest.hexdigest()[:length]
