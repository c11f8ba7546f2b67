import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from peft_minimal import bitfit, load_adapter, registry, save_adapter
from peft_minimal.train import TrainConfig, train
from torch.utils.data import TensorDataset


def biases_of(model):
    return {n: p.numel() for n, p in model.named_parameters() if n.endswith("bias")}


def test_only_the_biases_and_the_head_train(tiny_bert):
    model = bitfit.add_bitfit(tiny_bert, bitfit.BitFitConfig(modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(biases_of(model)) | {"classifier.weight"}
    # 2 layers x (q, k, v, attention out 32 each; intermediate 64; output 32; 2 LayerNorms 32 each)
    # + the embeddings' LayerNorm and the pooler (32 each); the head is counted apart
    assert registry.count_adapter_parameters(model) == 2 * (4 * 32 + 64 + 32 + 2 * 32) + 2 * 32


def test_training_moves_biases_and_nothing_else(tiny_bert):
    before = copy.deepcopy(tiny_bert.state_dict())
    model = bitfit.add_bitfit(tiny_bert, bitfit.BitFitConfig(modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 100, (16, 8), generator=g), torch.ones(16, 8, dtype=torch.long),
                         torch.randint(0, 3, (16,), generator=g))
    train(model, data, TrainConfig(steps=3, batch_size=8, lr=1e-2, progress=False))
    for name, value in model.state_dict().items():
        moved = not torch.equal(value, before[name])
        assert moved == (name.endswith("bias") or name.startswith("classifier.")), name


def test_the_papers_subset_selects_query_and_intermediate_biases(tiny_bert):
    config = bitfit.BitFitConfig.query_and_intermediate()
    assert sorted(bitfit.shapes(tiny_bert, config)) == [
        f"bert.encoder.layer.{i}.{kind}.bias" for i in range(2) for kind in ("attention.self.query", "intermediate.dense")]


def test_save_and_load_round_trip_holds_only_the_selected_biases(tiny_bert, tokens, tmp_path):
    fresh = copy.deepcopy(tiny_bert)
    model = bitfit.add_bitfit(tiny_bert, bitfit.BitFitConfig.query_and_intermediate(modules_to_save=["classifier"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3)
    save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == 4 + 2  # 2 layers x (query, intermediate) biases, and the head's weight and bias
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BITFIT"
    loaded = load_adapter(fresh, tmp_path)
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_merge_changes_nothing(tiny_bert, tokens):
    model = bitfit.add_bitfit(tiny_bert, bitfit.BitFitConfig())
    before = model(tokens).logits
    registry.merge(model)
    assert registry.merge_and_unload(model) is model and torch.equal(model(tokens).logits, before)


def test_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match="matches no bias of LlamaForCausalLM"):
        bitfit.add_bitfit(tiny_llama, bitfit.BitFitConfig())
    with pytest.raises(ValueError, match="must be a regular expression"):
        bitfit.BitFitConfig(bias_terms="(")
