import copy
import json

import pytest
import torch

from peft_minimal import load_adapter, lora, save_adapter

peft = pytest.importorskip("peft")


def trained_lora(model, seed=0):
    lora.add_lora(model, lora.LoRAConfig(r=4, alpha=8, target_modules=["query", "value"],
                                         modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_round_trip(tiny_bert, tokens, tmp_path):
    fresh = copy.deepcopy(tiny_bert)
    ours = trained_lora(tiny_bert)
    save_adapter(ours, tmp_path)
    loaded = load_adapter(fresh, tmp_path)
    assert torch.equal(loaded(tokens).logits, ours(tokens).logits)


def test_peft_loads_ours(tiny_bert, tokens, tmp_path):
    fresh = copy.deepcopy(tiny_bert)
    ours = trained_lora(tiny_bert)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(theirs(tokens).logits, ours(tokens).logits, atol=1e-5, rtol=0)


def test_we_load_peft(tiny_bert, tokens, tmp_path):
    fresh = copy.deepcopy(tiny_bert)
    theirs = peft.get_peft_model(tiny_bert, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"],
                                                            task_type="SEQ_CLS", init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(fresh, tmp_path)
    torch.testing.assert_close(ours(tokens).logits, theirs.eval()(tokens).logits, atol=1e-5, rtol=0)


def test_shape_mismatch_leaves_model_unchanged(tiny_bert, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification
    save_adapter(trained_lora(tiny_bert), tmp_path)
    other = BertForSequenceClassification(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100, num_labels=3))
    structure = str(other)
    with pytest.raises(ValueError, match="shape mismatch.*lora_A"):
        load_adapter(other, tmp_path)
    assert str(other) == structure


def test_missing_and_corrupted_files(tiny_bert, tmp_path):
    fresh = copy.deepcopy(tiny_bert)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(fresh, tmp_path / "nowhere")
    save_adapter(trained_lora(tiny_bert), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_adapter(fresh, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(fresh, tmp_path)
    assert not lora.lora_layers(fresh)


def test_saved_config_is_peft_lora(tiny_bert, tmp_path):
    save_adapter(trained_lora(tiny_bert), tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["task_type"] == "SEQ_CLS"


def test_save_without_adapter_is_refused(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="no peft_minimal adapter"):
        save_adapter(tiny_bert, tmp_path)


def _without_modules_to_save(method, model):
    """Each peft-compatible method added *without* modules_to_save, its adapter tensors randomised."""
    from peft_minimal import adalora, ia3
    add = {"LORA": lambda m: lora.add_lora(m, lora.LoRAConfig(r=4)),
           "IA3": lambda m: ia3.add_ia3(m, ia3.IA3Config()),
           "ADALORA": lambda m: adalora.add_adalora(m, adalora.AdaLoRAConfig(init_r=4, target_r=2, total_step=10))}
    add[method](model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("method", ["LORA", "IA3", "ADALORA"])
def test_seq_cls_without_modules_to_save_loads_in_peft(method, tiny_bert, tokens, tmp_path):
    """peft adds a SEQ_CLS head to modules_to_save itself and then needs its weights in the file
    (it raised KeyError 'base_model.model.classifier.weight'): we save the head for SEQ_CLS."""
    fresh = copy.deepcopy(tiny_bert)
    with torch.no_grad():  # a base whose head differs from ours: the saved head must be what decides
        fresh.classifier.weight.normal_()
    ours = _without_modules_to_save(method, tiny_bert)
    assert not ours.classifier.weight.requires_grad
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path).eval()
    torch.testing.assert_close(theirs(tokens).logits, ours(tokens).logits, atol=1e-5, rtol=0)
    again = load_adapter(copy.deepcopy(fresh), tmp_path)
    assert torch.equal(again(tokens).logits, ours(tokens).logits)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
