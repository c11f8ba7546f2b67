"""``fingerprint.source_fingerprint`` and the fingerprints stored in the chapters' outputs."""
import json
import re
import shutil
from pathlib import Path

import pytest

from peft_minimal import fingerprint

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
PRINTED = re.compile(r"peft_minimal source ([0-9a-f]+)")


def stored_fingerprint(notebook: Path) -> str | None:
    """The fingerprint printed by the notebook's first code cell, as stored in its outputs."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    first = next(cell for cell in cells if cell["cell_type"] == "code")
    text = "".join("".join(out.get("text", "")) for out in first.get("outputs", []) if out["output_type"] == "stream")
    match = PRINTED.search(text)
    return match.group(1) if match else None


def first_code_source(notebook: Path) -> str:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return "".join(next(cell for cell in cells if cell["cell_type"] == "code")["source"])


def test_stable_and_short():
    assert fingerprint.source_fingerprint() == fingerprint.source_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{12}", fingerprint.source_fingerprint())


def test_same_for_a_copy_anywhere_and_any_line_ending(tmp_path):
    copy = shutil.copytree(fingerprint.PACKAGE_DIR, tmp_path / "elsewhere" / "peft_minimal",
                           ignore=shutil.ignore_patterns("__pycache__"))
    assert fingerprint.source_fingerprint(copy) == fingerprint.source_fingerprint()
    for path in Path(copy).glob("*.py"):
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    (Path(copy) / "__pycache__").mkdir()
    (Path(copy) / "__pycache__" / "stale.py").write_text("x = 1\n")
    (Path(copy) / "notes.txt").write_text("not source\n")
    assert fingerprint.source_fingerprint(copy) == fingerprint.source_fingerprint()


def test_changes_when_the_source_changes(tmp_path):
    copy = Path(shutil.copytree(fingerprint.PACKAGE_DIR, tmp_path / "peft_minimal",
                                ignore=shutil.ignore_patterns("__pycache__")))
    before = fingerprint.source_fingerprint(copy)
    lora = copy / "lora.py"
    lora.write_text(lora.read_text(encoding="utf-8") + "\n# one more line\n", encoding="utf-8")
    edited = fingerprint.source_fingerprint(copy)
    assert edited != before
    (copy / "extra.py").write_text("", encoding="utf-8")  # a new (even empty) module counts
    assert fingerprint.source_fingerprint(copy) not in (before, edited)


def test_stored_fingerprint_is_read_from_the_first_code_cell(tmp_path):
    notebook = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# title"]},
                          {"cell_type": "code", "metadata": {}, "source": ["print()"], "execution_count": 1,
                           "outputs": [{"output_type": "stream", "name": "stdout",
                                        "text": ["torch 2.13.0\n", "peft_minimal source 0123456789ab\n"]}]}],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "chapter.ipynb"
    path.write_text(json.dumps(notebook), encoding="utf-8")
    assert stored_fingerprint(path) == "0123456789ab"
    notebook["cells"][1]["outputs"] = []
    path.write_text(json.dumps(notebook), encoding="utf-8")
    assert stored_fingerprint(path) is None


@pytest.mark.parametrize("notebook", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_first_cell_prints_the_fingerprint(notebook):
    assert "fingerprint.source_fingerprint()" in first_code_source(notebook)
    assert "NBVAL_IGNORE_OUTPUT" in first_code_source(notebook)  # it changes with every code change


@pytest.mark.parametrize("notebook", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_stored_outputs_ran_with_the_current_code(notebook):
    stored, current = stored_fingerprint(notebook), fingerprint.source_fingerprint()
    assert stored is not None, (f"{notebook.name} stores no 'peft_minimal source' line in its first cell's "
                                f"output: its outputs predate the fingerprint; run `make refresh`")
    assert stored == current, (f"{notebook.name} ran with peft_minimal source {stored}, the code is now {current}: "
                               f"its stored outputs may be stale; run `make refresh`")
