import ast
import copy
from dataclasses import dataclass, replace, field
from pathlib import Path

import pytest
import torch

import peft_minimal
from peft_minimal import adalora, adapters, bitfit, ia3, load_adapter, lora, prefix, prompt, registry, save_adapter, unipelt
from peft_minimal.layers import freeze_base
from peft_minimal.method import Method

# One small config per registered method; a method added to the registry must add one here.
CONFIGS = {"LORA": lambda: lora.LoRAConfig(r=4),
           "ADALORA": lambda: adalora.AdaLoRAConfig(init_r=4, target_r=2, total_step=10),
           "IA3": lambda: ia3.IA3Config(),
           "BOTTLENECK": lambda: adapters.BottleneckConfig(reduction_factor=8),
           "PREFIX_TUNING": lambda: prefix.PrefixTuningConfig(num_virtual_tokens=4),
           "PROMPT_TUNING": lambda: prompt.PromptTuningConfig(num_virtual_tokens=4),
           "P_TUNING": lambda: prompt.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=8),
           "UNIPELT": lambda: unipelt.UniPELTConfig(r=4, reduction_factor=8, num_virtual_tokens=4, encoder_hidden_size=8),
           "BITFIT": lambda: bitfit.BitFitConfig()}


def test_every_registered_method_has_a_test_config():
    assert set(registry.METHODS) == set(CONFIGS)


@pytest.mark.parametrize("peft_type", sorted(CONFIGS))
def test_shapes_name_exactly_the_adapter_parameters(peft_type, tiny_bert):
    """``shapes`` (what loading checks and counting adds up) equals the trainable tensors, before and after adding."""
    method, config = registry.method_named(peft_type), CONFIGS[peft_type]()
    before = method.shapes(tiny_bert, config)
    method.add(tiny_bert, config)
    trainable = {n: tuple(p.shape) for n, p in tiny_bert.named_parameters() if p.requires_grad}
    assert before == method.shapes(tiny_bert, config) == trainable
    assert {n for n, _ in tiny_bert.named_parameters() if method.is_adapter_tensor(n)} == set(trainable)
    assert registry.count_adapter_parameters(tiny_bert) == sum(p.numel() for p in tiny_bert.parameters() if p.requires_grad)
    assert registry.method_of(tiny_bert) is method


@pytest.mark.parametrize("peft_type", sorted(CONFIGS))
def test_saved_config_round_trips(peft_type):
    method, config = registry.method_named(peft_type), CONFIGS[peft_type]()
    saved = method.to_saved(config)
    assert saved["peft_type"] == peft_type
    # a prefix is saved as the MLP's output, so it loads flat (prefix tuning and UniPELT)
    flat = {"prefix_projection": False} if hasattr(config, "prefix_projection") else {}
    assert method.from_saved(saved) == replace(config, **flat)


def test_io_names_no_method():
    """Adding a method touches its own file and the registry, never io.py."""
    tree = ast.parse((Path(peft_minimal.__file__).parent / "io.py").read_text())
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
    assert not imported & {"lora", "adalora", "ia3", "adapters", "prefix", "prompt", "unipelt", "bitfit"}


@dataclass
class NormTuningConfig:
    """A toy method defined outside the package: train the LayerNorms."""

    modules_to_save: list[str] = field(default_factory=list)


def _add_norm_tuning(model, config):
    freeze_base(model, ("LayerNorm",), config.modules_to_save)
    model.peft_config = config
    return model


def _no_merge(model):
    raise ValueError("nothing to merge")


NORM_TUNING = Method("NORM_TUNING", NormTuningConfig, _add_norm_tuning,
                     to_saved=lambda c: {"peft_type": "NORM_TUNING", "modules_to_save": c.modules_to_save or None},
                     from_saved=lambda d: NormTuningConfig(list(d.get("modules_to_save") or [])),
                     shapes=lambda m, c: {n: tuple(p.shape) for n, p in m.named_parameters() if "LayerNorm" in n},
                     markers=("LayerNorm",), merge=_no_merge, unmerge=_no_merge, merge_and_unload=_no_merge,
                     can_merge=False, peft_loads=False)


def test_a_new_method_needs_only_a_registry_line(tiny_bert, tokens, tmp_path, monkeypatch):
    monkeypatch.setitem(registry.METHODS, "NORM_TUNING", NORM_TUNING)
    fresh = copy.deepcopy(tiny_bert)
    model = _add_norm_tuning(tiny_bert, NormTuningConfig())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    save_adapter(model, tmp_path)
    loaded = load_adapter(fresh, tmp_path)
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert registry.count_adapter_parameters(model) == 2 * 2 * 2 * 32 + 2 * 32  # 2 LNs/layer + embeddings' LN


def test_generic_merge_dispatches_to_the_method(tiny_bert, tokens):
    model = lora.add_lora(tiny_bert, lora.LoRAConfig(r=4))
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.weight.normal_()
    before = model(tokens).logits
    plain = registry.merge_and_unload(model)
    assert not lora.lora_layers(plain) and not hasattr(plain, "peft_config")
    torch.testing.assert_close(plain(tokens).logits, before, atol=1e-5, rtol=0)


def test_unknown_methods_are_refused(tiny_bert):
    with pytest.raises(ValueError, match="peft_type 'VERA' is not one of"):
        registry.method_named("VERA")
    with pytest.raises(ValueError, match="no peft_minimal adapter"):
        registry.method_of(tiny_bert)


LLAMA_CONFIGS = {"LORA": lambda m: lora.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]),
                 "ADALORA": lambda m: adalora.AdaLoRAConfig(init_r=4, target_r=2, total_step=10,
                                                            target_modules=["q_proj", "v_proj"]),
                 "IA3": lambda m: ia3.IA3Config.for_model(m),
                 "BOTTLENECK": lambda m: adapters.BottleneckConfig(reduction_factor=8),
                 "PREFIX_TUNING": lambda m: prefix.PrefixTuningConfig(num_virtual_tokens=4),
                 "PROMPT_TUNING": lambda m: prompt.PromptTuningConfig(num_virtual_tokens=4),
                 "P_TUNING": lambda m: prompt.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=8),
                 "UNIPELT": lambda m: unipelt.UniPELTConfig(r=4, reduction_factor=8, num_virtual_tokens=4,
                                                            encoder_hidden_size=8)}


@pytest.mark.parametrize("peft_type", sorted(LLAMA_CONFIGS))
def test_peft_loads_what_we_save_when_the_method_says_so(peft_type, tiny_llama, tokens, tmp_path):
    peft = pytest.importorskip("peft")
    method = registry.method_named(peft_type)
    fresh = copy.deepcopy(tiny_llama)
    ours = method.add(tiny_llama, LLAMA_CONFIGS[peft_type](tiny_llama))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    save_adapter(ours, tmp_path)
    if not method.peft_loads:  # our own layout: peft refuses its peft_type
        with pytest.raises(KeyError, match=peft_type):
            peft.PeftModel.from_pretrained(fresh, tmp_path)
        return
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(theirs(tokens).logits, ours(tokens).logits, atol=1e-5, rtol=0)
