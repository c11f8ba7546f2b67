import copy
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peft_minimal import adapters, count_parameters, load_adapter, registry, save_adapter
from peft_minimal.adapters import BottleneckConfig

FIXTURES = Path(__file__).parent / "fixtures" / "adapters"
MODELS = ["tiny_bert", "tiny_llama"]
# Ours against AdapterHub's outputs (transformers 5 vs 4.57.6, sdpa vs eager on Llama); measured at most 7.2e-7, while
# every adapter moves the outputs by more than 0.1.
ORACLE_ATOL = 1e-5


def randomise_adapters(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("placement", adapters.PLACEMENTS)
@pytest.mark.parametrize("model_name", MODELS)
def test_identity_at_init(model_name, placement, request, tokens):
    """W_up = 0, so f = 0 and every placement (Pfeiffer's reused LayerNorm too) is the base model, bit for bit."""
    base = request.getfixturevalue(model_name)
    model = adapters.add_adapters(copy.deepcopy(base), BottleneckConfig(placement=placement, reduction_factor=8))
    assert torch.equal(model(tokens).logits, base(tokens).logits)
    randomise_adapters(model)  # and the adapters are really on the path
    assert (model(tokens).logits - base(tokens).logits).abs().max() > 1e-3


def test_bert_init_is_the_references_normal(tiny_bert, tokens):
    model = adapters.add_adapters(copy.deepcopy(tiny_bert), BottleneckConfig(reduction_factor=0.25, init_weights="bert"))
    ups = torch.cat([m.adapter_up.weight.flatten() for m in adapters.adapter_layers(model).values()])
    assert 0.015 < ups.std() < 0.025 and abs(ups.mean()) < 0.005  # N(0, 0.02), 2 x 32 x 128 draws
    assert not torch.equal(model(tokens).logits, tiny_bert(tokens).logits)


@pytest.mark.parametrize("placement", adapters.PLACEMENTS)
@pytest.mark.parametrize("model_name", MODELS)
def test_parameter_count_matches_formula(model_name, placement, request):
    model = request.getfixturevalue(model_name)
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    config = BottleneckConfig(placement=placement, reduction_factor=8)
    adapters.add_adapters(model, config)
    b = d // 8
    per_adapter = 2 * d * b + b + d
    expected = layers * (2 if placement == "houlsby" else 1) * per_adapter
    assert count_parameters(model)[0] == expected == registry.count_adapter_parameters(model)
    # the io contract: shapes() names exactly the trainable tensors, with their shapes
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert adapters.shapes(model, config) == trainable


@pytest.mark.parametrize("placement", adapters.PLACEMENTS)
def test_gradients_reach_only_adapters_and_head(placement, tiny_bert, tokens):
    # "bert" init and swish: with W_up = 0 or a dead ReLU some adapter gradients are exactly 0
    model = adapters.add_adapters(tiny_bert, BottleneckConfig(placement=placement, reduction_factor=8, non_linearity="swish",
                                                              init_weights="bert", modules_to_save=["classifier"]))
    model.train()
    model(tokens, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    for name, p in model.named_parameters():
        if "adapter_" in name or name.startswith("classifier."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("placement", adapters.PLACEMENTS)
@pytest.mark.parametrize("model_name", MODELS)
def test_save_load_round_trip(model_name, placement, request, tokens, tmp_path):
    base = request.getfixturevalue(model_name)
    ours = randomise_adapters(adapters.add_adapters(copy.deepcopy(base), BottleneckConfig.parallel()
                                                    if placement == "parallel" else
                                                    BottleneckConfig(placement=placement, reduction_factor=8)))
    save_adapter(ours, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "BOTTLENECK" and meta["placement"] == placement
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    # a sequence classifier's head is always saved (peft's SEQ_CLS rule), so it comes back as a module to save
    heads = ["classifier"] if model_name == "tiny_bert" else []
    assert loaded.peft_config == replace(ours.peft_config, modules_to_save=heads)
    assert torch.equal(loaded(tokens).logits, ours(tokens).logits)


def test_load_refuses_wrong_bottleneck_size(tiny_bert, tmp_path):
    save_adapter(adapters.add_adapters(copy.deepcopy(tiny_bert), BottleneckConfig(reduction_factor=8)), tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**meta, "reduction_factor": 4}))
    structure = str(tiny_bert)
    with pytest.raises(ValueError, match="shape mismatch.*adapter_down"):
        load_adapter(tiny_bert, tmp_path)
    assert str(tiny_bert) == structure


def test_merge_raises(tiny_bert, tokens):
    model = adapters.add_adapters(tiny_bert, BottleneckConfig.houlsby(reduction_factor=8))
    before = model(tokens).logits
    for merge in (adapters.merge, adapters.merge_and_unload, registry.merge, registry.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged.*non-linear"):
            merge(model)
    assert not registry.method_of(model).can_merge
    assert torch.equal(model(tokens).logits, before)


def test_bad_configurations_are_refused(tiny_bert):
    with pytest.raises(ValueError, match="placement must be one of"):
        BottleneckConfig(placement="after_attention")
    with pytest.raises(ValueError, match="no bottleneck"):
        adapters.add_adapters(tiny_bert, BottleneckConfig(reduction_factor=64))
    adapters.add_adapters(tiny_bert, BottleneckConfig())
    with pytest.raises(ValueError, match="already has bottleneck adapters"):
        adapters.add_adapters(tiny_bert, BottleneckConfig())
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16))
    with pytest.raises(ValueError, match="model types.*'gpt2'"):
        adapters.add_adapters(gpt2, BottleneckConfig())


# --- oracle: AdapterHub `adapters` 1.3.0 outputs, written by fixtures/adapters/generate.py ---

# AdapterHub keeps an adapter beside a layer (``<layer>.<location>.adapters.a.*``); ours lives in the
# module it wraps (``<layer>.<site>.adapter.*``).
SITE = {("bert", "attention.output"): {"houlsby": "attention.output.dense"},
        ("bert", "output"): {"houlsby": "output.dense", "pfeiffer": "output.LayerNorm", "parallel": "output"},
        ("llama", "attention_adapters"): {"houlsby": "self_attn.o_proj"},
        ("llama", "output_adapters"): {"houlsby": "mlp.down_proj", "pfeiffer": "mlp", "parallel": "mlp"}}


def our_name(family: str, placement: str, key: str) -> str:
    layer, location, rest = re.fullmatch(r"(.*\.\d+)\.(.*?)\.adapters\.a\.(.*)", key).groups()
    return f"{layer}.{SITE[family, location][placement]}.adapter.{rest.replace('adapter_down.0.', 'adapter_down.')}"


def read_fixture(family: str):
    with safe_open(str(FIXTURES / f"{family}.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, {k: json.loads(v) for k, v in f.metadata().items()}


def outputs(model, t, family):
    with torch.no_grad():
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], output_hidden_states=True)
    real = t["attention_mask"].bool() if family == "llama" else slice(None)  # Llama: left pads have no output
    return out.logits[real], out.hidden_states[-1][real]


@pytest.fixture(scope="module", params=["bert", "llama"])
def oracle(request):
    family = request.param
    t, meta = read_fixture(family)
    make = {"bert": lambda: BertForSequenceClassification(BertConfig(**meta["model_config"])),
            "llama": lambda: LlamaForCausalLM(LlamaConfig(**meta["model_config"]))}[family]
    base = make().eval()
    with torch.no_grad():
        params = dict(base.named_parameters())
        assert set(params) == {k.removeprefix("base.") for k in t if k.startswith("base.")}
        for name, p in params.items():
            p.copy_(t[f"base.{name}"])
    return family, t, meta, base


def test_base_model_matches_fixture(oracle):
    family, t, _, base = oracle
    real = t["attention_mask"].bool() if family == "llama" else slice(None)
    logits, hidden = outputs(base, t, family)
    torch.testing.assert_close(logits, t["out.base.logits"][real], atol=ORACLE_ATOL, rtol=0)
    torch.testing.assert_close(hidden, t["out.base.hidden"][real], atol=ORACLE_ATOL, rtol=0)


@pytest.mark.parametrize("placement", adapters.PLACEMENTS)
def test_matches_adapterhub(oracle, placement):
    family, t, meta, base = oracle
    hub = meta["adapter_configs"][placement]
    # the formulas ours implements assume these AdapterHub switches
    assert (hub["mh_adapter"], hub["is_parallel"], hub["original_ln_before"]) == (
        placement == "houlsby", placement == "parallel", placement == "pfeiffer")
    assert hub["original_ln_after"] and hub["residual_before_ln"] is True and not hub["ln_before"] and not hub["ln_after"]
    config = BottleneckConfig(placement=placement, reduction_factor=hub["reduction_factor"],
                              non_linearity=hub["non_linearity"], scaling=hub["scaling"])
    model = adapters.add_adapters(copy.deepcopy(base), config)
    weights = {our_name(family, placement, k.removeprefix(f"adapter.{placement}.")): v
               for k, v in t.items() if k.startswith(f"adapter.{placement}.")}
    params = dict(model.named_parameters())
    assert set(weights) == {n for n in params if "adapter_" in n}
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    real = t["attention_mask"].bool() if family == "llama" else slice(None)
    logits, hidden = outputs(model, t, family)
    for ours, key in ((logits, "logits"), (hidden, "hidden")):
        theirs = t[f"out.{placement}.{key}"][real]
        torch.testing.assert_close(ours, theirs, atol=ORACLE_ATOL, rtol=0)
        assert (theirs - t[f"out.base.{key}"][real]).abs().max() > 100 * ORACLE_ATOL  # the adapter matters


@pytest.mark.parametrize("placement", adapters.PLACEMENTS)
def test_constructors_have_adapterhub_defaults(placement):
    hub = read_fixture("bert")[1]["adapter_configs"][placement]
    ours = getattr(BottleneckConfig, placement)()
    assert (ours.non_linearity, ours.scaling) == (hub["non_linearity"], hub["scaling"])
    assert ours.reduction_factor == {"houlsby": 16, "pfeiffer": 16, "parallel": 2}[placement]
