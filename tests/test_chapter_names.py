"""Every ``module.name`` a chapter uses from peft_minimal exists, so a refactor that moves or
drops a name fails here in seconds instead of in a chapter minutes into nbval."""
import importlib
import json
import re
from pathlib import Path

import pytest

CHAPTERS = sorted((Path(__file__).resolve().parent.parent / "chapters").glob("*.ipynb"))
MODULES = ("experiments", "grid", "report", "protocol", "lora", "adalora", "ia3", "fewshot", "svd", "bench",
           "serve", "registry", "io")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_uses_only_existing_names(chapter):
    code = "\n".join("".join(c["source"]) for c in json.loads(chapter.read_text())["cells"] if c["cell_type"] == "code")
    imported = {name.strip() for names in re.findall(r"from peft_minimal import ([\w, ]+)", code)
                for name in names.split(",")}
    missing = []
    for module in set(MODULES) & imported:  # a chapter's own variable may share a module's name
        mod = importlib.import_module(f"peft_minimal.{module}")
        for name in set(re.findall(rf"(?<![\w.]){module}\.([A-Za-z_]\w*)", code)):
            if not hasattr(mod, name):
                missing.append(f"{module}.{name}")
    assert not missing, missing
