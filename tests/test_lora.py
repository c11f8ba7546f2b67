import copy

import pytest
import torch
from torch import nn

from peft_minimal import count_parameters, lora


def add(model, **kw):
    cfg = lora.LoRAConfig(**{"r": 4, "alpha": 8, "target_modules": ["query", "value"], **kw})
    return lora.add_lora(model, cfg)


def randomize_B(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def test_identity_at_init(tiny_bert, tokens):
    before = tiny_bert(tokens).logits
    add(tiny_bert)
    assert torch.equal(tiny_bert(tokens).logits, before)


def test_init_and_scaling():
    layer = lora.LoRALinear(nn.Linear(16, 8), r=4, alpha=8)
    assert layer.scaling == 2.0 and torch.all(layer.lora_B.weight == 0)
    assert layer.lora_A.weight.abs().max() <= 1 / 16 ** 0.5 + 1e-6  # Kaiming-uniform(a=sqrt5) bound
    assert lora.LoRALinear(nn.Linear(16, 8), r=4, alpha=8, use_rslora=True).scaling == 4.0


def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.9).train()
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0: dropout must not touch the base path


def test_parameter_count_matches_formula(tiny_bert):
    add(tiny_bert, r=4)
    trainable, _ = count_parameters(tiny_bert)
    assert trainable == 2 * 2 * 4 * (32 + 32)  # layers x modules x r(d + k)


def test_merge_unmerge(tiny_bert, tokens):
    add(tiny_bert)
    randomize_B(tiny_bert)
    weights = {n: p.clone() for n, p in tiny_bert.named_parameters() if "base_layer" in n}
    unmerged = tiny_bert(tokens).logits
    lora.merge(tiny_bert)
    assert any(not torch.equal(p, weights[n]) for n, p in tiny_bert.named_parameters() if n in weights)
    torch.testing.assert_close(tiny_bert(tokens).logits, unmerged, atol=1e-5, rtol=0)
    lora.unmerge(tiny_bert)
    for n, p in tiny_bert.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)


def test_merge_and_unload_gives_plain_model(tiny_bert, tokens):
    add(tiny_bert)
    randomize_B(tiny_bert)
    out = tiny_bert(tokens).logits
    plain = lora.merge_and_unload(tiny_bert)
    assert not lora.lora_layers(plain)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(tokens).logits, out, atol=1e-5, rtol=0)


def test_training_changes_only_adapter(tiny_bert, tokens):
    add(tiny_bert, modules_to_save=["classifier"])
    base = {n: p.clone() for n, p in tiny_bert.named_parameters() if not p.requires_grad}
    adapter = {n: p.clone() for n, p in tiny_bert.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in tiny_bert.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        tiny_bert(tokens, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in tiny_bert.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # bit-identical
        else:
            assert not torch.equal(p, adapter[n]), n


def test_llama_targets(tiny_llama, tokens):
    before = tiny_llama(tokens).logits
    lora.add_lora(tiny_llama, lora.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert len(lora.lora_layers(tiny_llama)) == 4
    assert torch.equal(tiny_llama(tokens).logits, before)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"target_modules": ["nope"]}, ValueError, "matched no module"),
    ({"target_modules": ["attention"]}, TypeError, "nn.Linear.*BertAttention"),
])
def test_bad_targets_leave_model_unchanged(tiny_bert, kwargs, error, match):
    reference = copy.deepcopy(tiny_bert)
    with pytest.raises(error, match=match):
        add(tiny_bert, **kwargs)
    assert str(tiny_bert) == str(reference)
    assert all(p.requires_grad for p in tiny_bert.parameters())


@pytest.mark.parametrize("r", [0, -1, 2.5])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="positive integer"):
        lora.LoRAConfig(r=r)


def test_adding_twice_is_refused(tiny_bert):
    add(tiny_bert)
    structure = str(tiny_bert)
    with pytest.raises(ValueError, match="already has LoRA"):
        add(tiny_bert)
    assert str(tiny_bert) == structure


def copy_lora_into_peft(ours, theirs):
    """Same lora_A / lora_B tensors into peft's model (its keys carry the adapter name)."""
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                key = "base_model.model." + name.replace(".weight", ".default.weight")
                peft_params[key].copy_(p)


@pytest.mark.parametrize("fixture, targets", [("tiny_bert", ["query", "value"]),
                                              ("tiny_llama", ["q_proj", "v_proj", "down_proj"])])
def test_parity_with_peft(request, fixture, targets, tokens):
    peft = pytest.importorskip("peft")
    base = request.getfixturevalue(fixture)
    plain = base(tokens).logits
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    ours = lora.add_lora(base, lora.LoRAConfig(r=4, alpha=8, target_modules=targets))
    randomize_B(ours)
    copy_lora_into_peft(ours, theirs)
    want = theirs(tokens).logits
    assert (want - plain).abs().max() > 1e-4  # the adapter really acts
    torch.testing.assert_close(ours(tokens).logits, want, atol=1e-5, rtol=0)
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
