import copy

import pytest
import torch

from peft_minimal import count_parameters, ia3, load_adapter, save_adapter
from peft_minimal.train import TrainConfig, train


def random_vectors(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def test_bert_defaults_hit_the_papers_places_only(tiny_bert):
    ia3.add_ia3(tiny_bert, ia3.IA3Config.for_model(tiny_bert))
    layers = ia3.ia3_layers(tiny_bert)
    suffixes = sorted({name.split("layer.0.", 1)[1] for name in layers if ".layer.0." in name})
    assert suffixes == ["attention.self.key", "attention.self.value", "output.dense"]
    assert layers["bert.encoder.layer.0.output.dense"].is_feedforward
    assert not layers["bert.encoder.layer.0.attention.self.key"].is_feedforward
    # L (d_k + d_v + d_ff): 2 layers, hidden 32, FFN 64
    assert count_parameters(tiny_bert)[0] == 2 * (32 + 32 + 64)


def test_peft_default_suffix_also_catches_attention_output(tiny_bert):
    from peft import IA3Config, get_peft_model
    theirs = get_peft_model(tiny_bert, IA3Config(target_modules=["key", "value", "output.dense"],
                                                 feedforward_modules=["output.dense"]))
    names = [n for n, _ in theirs.named_modules() if n.endswith("attention.output.dense")]
    assert any(type(m).__name__ == "Linear" and hasattr(m, "ia3_l") for n, m in theirs.named_modules()
               if n in names)


def test_llama_defaults(tiny_llama):
    ia3.add_ia3(tiny_llama, ia3.IA3Config.for_model(tiny_llama))
    layers = ia3.ia3_layers(tiny_llama)
    assert {n.rsplit(".", 1)[1] for n in layers} == {"k_proj", "v_proj", "down_proj"}
    assert all(m.is_feedforward == n.endswith("down_proj") for n, m in layers.items())
    cfg = tiny_llama.config
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    assert count_parameters(tiny_llama)[0] == 2 * (kv + kv + cfg.intermediate_size)


def test_identity_at_init_and_only_vectors_train(tiny_bert, tokens):
    before = tiny_bert(tokens).logits
    ia3.add_ia3(tiny_bert, ia3.IA3Config(modules_to_save=[]))
    assert torch.equal(tiny_bert(tokens).logits, before)
    snapshot = {n: p.clone() for n, p in tiny_bert.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(0, 100, (32, 10), generator=g),
                                          torch.ones(32, 10, dtype=torch.long), torch.randint(0, 3, (32,), generator=g))
    train(tiny_bert, data, TrainConfig(steps=5, batch_size=8, lr=1e-1, progress=False), dev=torch.device("cpu"))
    changed = {n for n, p in tiny_bert.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed == {n for n in snapshot if "ia3_l" in n}  # every vector moved, nothing else did


def test_outputs_equal_peft_for_the_same_vectors(tiny_bert, tiny_llama, tokens):
    from peft import IA3Config, get_peft_model
    for model in (tiny_bert, tiny_llama):
        cfg = ia3.IA3Config.for_model(model)
        theirs = get_peft_model(copy.deepcopy(model), IA3Config(target_modules=cfg.target_modules,
                                                                feedforward_modules=cfg.feedforward_modules))
        random_vectors(theirs)
        ours = ia3.add_ia3(copy.deepcopy(model), cfg)
        random_vectors(ours)
        assert ({n.removeprefix("base_model.model.").replace(".default", "") for n, p in theirs.named_parameters()
                 if p.requires_grad} == {n for n, p in ours.named_parameters() if p.requires_grad})
        assert torch.allclose(ours(tokens).logits, theirs(tokens).logits, atol=1e-5)


def test_merge_is_exact_and_unmerge_restores_bits(tiny_bert, tokens):
    ia3.add_ia3(tiny_bert, ia3.IA3Config())
    random_vectors(tiny_bert)
    weights = {n: p.clone() for n, p in tiny_bert.named_parameters()}
    unmerged = tiny_bert(tokens).logits
    ia3.merge(tiny_bert)
    assert torch.allclose(tiny_bert(tokens).logits, unmerged, atol=1e-5)
    ia3.unmerge(tiny_bert)
    assert all(torch.equal(p, weights[n]) for n, p in tiny_bert.named_parameters())
    plain = ia3.merge_and_unload(tiny_bert)
    assert not ia3.ia3_layers(plain) and torch.allclose(plain(tokens).logits, unmerged, atol=1e-5)


def test_peft_unmerge_is_inexact_ours_is_not():
    from peft import IA3Config, get_peft_model
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64))
    theirs = get_peft_model(copy.deepcopy(net), IA3Config(target_modules=["0"], feedforward_modules=[]))
    ours = ia3.add_ia3(copy.deepcopy(net), ia3.IA3Config(target_modules=["0"], feedforward_modules=[]))
    for model in (theirs, ours):
        random_vectors(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "ia3_l" in n:
                    p[:4] = 0.0  # a scale trained to zero
    original = net[0].weight.clone()
    theirs.merge_adapter()
    theirs.unmerge_adapter()
    ours[0].merge()
    ours[0].unmerge()
    assert torch.equal(ours[0].base_layer.weight, original)
    assert not torch.equal(theirs.base_model.model[0].base_layer.weight, original)


def test_bad_configs_are_refused_and_model_unchanged(tiny_bert):
    before = copy.deepcopy(tiny_bert.state_dict())
    with pytest.raises(ValueError, match="must be among target_modules"):
        ia3.add_ia3(tiny_bert, ia3.IA3Config(target_modules=["key", "value"], feedforward_modules=["output.dense"]))
    with pytest.raises(ValueError, match="matched no module"):
        ia3.add_ia3(tiny_bert, ia3.IA3Config(target_modules=["k_proj"], feedforward_modules=["k_proj"]))
    with pytest.raises(ValueError, match="feedforward_modules"):
        ia3.add_ia3(tiny_bert, ia3.IA3Config(target_modules=["key"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="model_type"):
        ia3.IA3Config.for_model(torch.nn.Linear(2, 2))
    assert not ia3.ia3_layers(tiny_bert)
    assert all(torch.equal(v, tiny_bert.state_dict()[k]) for k, v in before.items())


def test_save_load_in_peft_layout(tiny_bert, tokens, tmp_path):
    from peft import PeftModel
    model = ia3.add_ia3(copy.deepcopy(tiny_bert), ia3.IA3Config(modules_to_save=["classifier"]))
    random_vectors(model)
    expected = model(tokens).logits
    save_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path)
    assert torch.allclose(theirs(tokens).logits, expected, atol=1e-5)
    again = load_adapter(copy.deepcopy(tiny_bert), tmp_path)
    assert torch.equal(again(tokens).logits, expected)
    theirs.save_pretrained(tmp_path / "peft")
    from_peft = load_adapter(copy.deepcopy(tiny_bert), tmp_path / "peft")
    assert torch.allclose(from_peft(tokens).logits, expected, atol=1e-5)
