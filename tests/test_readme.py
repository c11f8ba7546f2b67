"""The README's ```python blocks run as written, in order, in one namespace (real MiniLM, offline)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_blocks_are_found():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2 and all(block.strip() for block in blocks)


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # save_adapter writes "my-adapter" here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    namespace = {"__name__": "readme"}
    for i, block in enumerate(python_blocks(README.read_text(encoding="utf-8")), start=1):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"README python block {i} fails as written: {type(error).__name__}: {error}")

    from peft_minimal import find_target_modules, ia3

    assert (tmp_path / "my-adapter").is_dir()
    assert 0 < namespace["trainable"] < 0.01 * namespace["total"]
    # the AdaLoRA example adapts exactly the six matrices of the 6 layers, not the pooler
    targets = [name for name, _ in find_target_modules(namespace["model"], namespace["six"])]
    assert len(targets) == 36 and not any("pooler" in name for name in targets), targets
    assert namespace["config"].total_step == namespace["steps"]
    assert sum(isinstance(m, ia3.IA3Linear) for m in namespace["model"].modules()) == 18  # key, value, FFN out x 6
