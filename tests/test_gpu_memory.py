"""tools/gpu_memory.py: its CPU fallback (the measurement itself needs a GPU; its numbers from one
lent H200 are in results/device-h200/)."""
import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parent.parent / "tools" / "gpu_memory.py"


@pytest.fixture(scope="module")
def gpu_memory():
    spec = importlib.util.spec_from_file_location("gpu_memory", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_memory_check_says_it_needs_cuda_and_writes_nothing(gpu_memory, tmp_path, capsys):
    assert gpu_memory.run_memory_check(tmp_path, 2, 8) is None
    assert "needs CUDA" in capsys.readouterr().out and not list(tmp_path.iterdir())
