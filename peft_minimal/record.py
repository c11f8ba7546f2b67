"""Resumable experiment records: one JSON file per grid, written after every finished run.

A grid of runs can take hours on two CPU cores. Each run has a key that names its whole
configuration; :meth:`Record.run` computes a run only when its key is not in the file yet,
and writes the file (atomically: a temporary file, then a rename) as soon as the run ends.
A grid cut off at any point, by a session ending or a crash, resumes where it stopped::

    record = Record.open(results / "protocol-ci.json", name="protocol", scale={...})
    for spec in grid:
        record.run(spec.key(), lambda: run(spec))   # skipped if already recorded

Every run carries the environment that made it (versions, device, threads), so a record
filled by several machines or sessions says which numbers came from where. Two processes may
fill one record side by side (two halves of a grid, one thread each): every save merges the
runs the other process wrote since, under a lock on ``<record>.lock``, so neither loses the
other's runs.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per record there
    fcntl = None


def environment() -> dict:
    """Versions, device and threads: enough to say what produced a number."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


class Record:
    """The runs of one grid, keyed by configuration, persisted after each run."""

    def __init__(self, path: Path, data: dict) -> None:
        self.path, self.data = Path(path), data
        self.written: set[str] = set()  # the runs this process computed or updated

    @classmethod
    def open(cls, path: str | Path, name: str, scale: dict) -> "Record":
        """Load ``path`` if it exists (its scale must match), or start an empty record."""
        path = Path(path)
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("scale") != scale:
                raise ValueError(f"{path} was recorded at scale {data.get('scale')}, not {scale}; "
                                 f"move it away to start over")
            return cls(path, data)
        return cls(path, {"name": name, "scale": scale, "runs": {}})

    def __contains__(self, key: str) -> bool:
        return key in self.data["runs"]

    def __getitem__(self, key: str) -> dict:
        return self.data["runs"][key]

    def __len__(self) -> int:
        return len(self.data["runs"])

    def runs(self) -> list[dict]:
        return list(self.data["runs"].values())

    def run(self, key: str, compute: Callable[[], dict]) -> dict:
        """The recorded run ``key``, computing and saving it first if it is missing."""
        if key not in self:
            start = time.time()
            result = compute()
            result.update(key=key, environment=environment(), wall_seconds=round(time.time() - start, 1),
                          finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self.data["runs"][key] = result
            self.written.add(key)
            self.save()
        return self[key]

    def update(self, key: str, fields: dict) -> dict:
        """Add ``fields`` to the recorded run ``key`` (e.g. its test scores, read later) and save."""
        self.data["runs"][key].update(fields)
        self.written.add(key)
        self.save()
        return self[key]

    def save(self) -> None:
        """Write the record, first taking in what another process saved to the same file since
        (:func:`merge_runs`); the lock keeps two writers from interleaving read and write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(self.path.suffix + ".lock"), "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                on_disk = json.loads(self.path.read_text())
                if on_disk.get("scale") != self.data["scale"]:
                    raise ValueError(f"{self.path} now holds a record at scale {on_disk.get('scale')}, "
                                     f"not {self.data['scale']}: not merged, not overwritten")
                self.data["runs"] = merge_runs(on_disk["runs"], self.data["runs"], self.written)
            tmp = self.path.with_suffix(self.path.suffix + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1) + "\n")
            os.replace(tmp, self.path)  # a reader never sees half a file, a crash never loses the old one


def merge_runs(on_disk: dict, ours: dict, written: set[str]) -> dict:
    """The runs on disk with ours laid over them: a run only we hold is added, and a run we
    computed or updated (``written``) takes our fields over the disk's, keeping fields only the
    disk has (another process's test scores, say). Every other run is the disk's version, which
    is at least as new as ours."""
    merged = dict(on_disk)
    for key, run in ours.items():
        if key not in merged:
            merged[key] = run
        elif key in written:
            merged[key] = {**merged[key], **run}
    return merged
