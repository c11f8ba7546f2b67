"""The scale-out command, in one process, with conftest's tiny BERT and toy data standing in for
MiniLM and 20 Newsgroups (the real run is the book appendix's command)."""
import json

import torch
from torch.utils.data import TensorDataset

from peft_minimal import lora, scale_out
from peft_minimal.grid import Protocol


def toy(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, 8), generator=g)
    return TensorDataset(ids, torch.ones_like(ids), ids[:, 0] % 3)


def test_scale_out_trains_resumes_and_saves(monkeypatch, tiny_bert, tmp_path, capsys):
    proto = Protocol("ci", max_length=8, validation_per_class=1, batch_size=8, steps=((None, 6),), evaluations=2)

    def prepare(method, r, seed, steps):
        torch.manual_seed(seed)
        return lora.add_lora(tiny_bert, lora.LoRAConfig(r=r, target_modules=["query", "value"],
                                                        modules_to_save=["classifier"])), None
    monkeypatch.setattr(scale_out, "current_protocol", lambda: proto)
    monkeypatch.setattr(scale_out, "protocol_data", lambda *_: (None, None, None, toy(12, 1), toy(20, 2)))
    monkeypatch.setattr(scale_out, "prepare", prepare)
    monkeypatch.setattr(scale_out, "tokenize", lambda tokenizer, texts, length: toy(40, 0))
    argv = ["--method", "lora", "--r", "2", "--lr", "1e-2", "--checkpoint-dir", str(tmp_path / "run"),
            "--checkpoint-every", "2", "--save", str(tmp_path / "adapter")]
    summary = scale_out.main(argv)
    assert summary["steps"] == 6 and summary["processes"] == 1 and 0 <= summary["test_accuracy"] <= 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert (tmp_path / "run" / "checkpoint.pt").exists() and (tmp_path / "adapter" / "adapter_config.json").exists()
