"""UniPELT: behaviour on the tiny models, and golden outputs of AdapterHub ``adapters`` 1.3.0
(``fixtures/adapters/generate_unipelt.py``) per gated component and for the union."""
import copy
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from peft_minimal import count_parameters, load_adapter, prefix, registry, save_adapter, unipelt
from peft_minimal.io import read_adapter
from peft_minimal.unipelt import UniPELTConfig

FIXTURES = Path(__file__).parent / "fixtures" / "adapters"
MODELS = ["tiny_bert", "tiny_llama"]
SMALL = {"r": 4, "reduction_factor": 8, "num_virtual_tokens": 3, "encoder_hidden_size": 8}
# right padding: real tokens keep positions 0..n-1 and (causal Llama) never see the pads, so
# only the gates could notice the padding
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])


@pytest.fixture
def ids():
    return torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(1))


def add(base, **kwargs):
    return unipelt.add_unipelt(copy.deepcopy(base), UniPELTConfig(**{**SMALL, **kwargs}))


def randomise(model, seed=0, std=0.3):
    """Every UniPELT parameter (gates too) to std·N(0, 1): far from init, gates vary across tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if registry.method_of(model).is_adapter_tensor(name):
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def close_gates(model, kind):
    """sigmoid(w·x - 1e4) is exactly 0 in float32."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, unipelt.Gate) and name.endswith(kind):
                m.bias.fill_(-1e4)
    return model


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def last_hidden(model, ids, mask=MASK):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1][mask.bool()]


@pytest.mark.parametrize("model_name", MODELS)
def test_identity_at_init_where_the_paper_says(model_name, request, ids):
    """LoRA starts at B = 0 and a "zero_up" adapter at W_up = 0: the base model, bit for bit. The paper's
    UniPELT is not: its adapter is N(0, 0.02) (the reference's init, our default) and a prefix is never zero."""
    base = request.getfixturevalue(model_name)
    want = logits(base, ids, MASK)
    assert torch.equal(logits(add(base, adapter=False, prefix=False), ids, MASK), want)
    assert torch.equal(logits(add(base, prefix=False, adapter_init="zero_up"), ids, MASK), want)
    assert not torch.equal(logits(add(base), ids, MASK), want)
    assert not torch.equal(logits(add(base, lora=False, adapter=False), ids, MASK), want)


@pytest.mark.parametrize("model_name", MODELS)
def test_closed_lora_and_adapter_gates_give_the_base_model(model_name, request, ids):
    base = request.getfixturevalue(model_name)
    model = randomise(add(base, prefix=False))
    assert (logits(model, ids, MASK) - logits(base, ids, MASK)).abs().max() > 1e-2  # they matter when open
    close_gates(model, "lora_gate")
    close_gates(model, "adapter_gate")
    assert torch.equal(logits(model, ids, MASK), logits(base, ids, MASK))


@pytest.mark.parametrize("model_name", MODELS)
def test_closed_prefix_gate_is_not_the_identity(model_name, request, ids):
    """A closed gate zeroes the prefix keys and values, but zero keys still score q·0 = 0 and take
    softmax mass exp(0) each: every real token's attention weights shrink by Z / (Z + P) with
    Z = sum_j exp(q·k_j / sqrt(d)), and the zero values add nothing back. So the closed prefix equals a
    prefix of zeros, not the base model (the reference code behaves the same; research note 3, quirk 7)."""
    base = request.getfixturevalue(model_name)
    model = close_gates(randomise(add(base, lora=False, adapter=False)), "prefix_gate")
    zeros = prefix.add_prefix(copy.deepcopy(base), prefix.PrefixTuningConfig(
        num_virtual_tokens=3, init_weights="zero", shift_positions=False))
    assert not zeros.prompt_encoder().any()
    torch.testing.assert_close(last_hidden(model, ids), last_hidden(zeros, ids), atol=1e-6, rtol=0)
    assert (last_hidden(model, ids) - last_hidden(base, ids)).abs().max() > 1e-3  # hidden states are O(1)


@pytest.mark.parametrize("model_name", MODELS)
def test_padding_changes_nothing_with_masked_gates_and_does_with_the_references_mean(model_name, request, ids):
    base = request.getfixturevalue(model_name)
    masked = randomise(add(base))
    mean = randomise(add(base, gate_pooling="mean"))
    for i, n in enumerate(MASK.sum(1).tolist()):
        alone = ids[i:i + 1, :n]
        padded_masked, padded_mean = logits(masked, ids, MASK)[i], logits(mean, ids, MASK)[i]
        if model_name == "tiny_llama":  # one row of logits per token: the real ones
            padded_masked, padded_mean = padded_masked[:n], padded_mean[:n]
        want = logits(masked, alone)[0]
        assert torch.equal(logits(mean, alone)[0], want)  # no padding: both poolings agree
        torch.testing.assert_close(padded_masked, want, atol=1e-6, rtol=0)
        if n < ids.shape[1]:  # the reference's mean reads the pads: the same message, other outputs
            assert (padded_mean - want).abs().max() > 1e-4


@pytest.mark.parametrize("model_name", MODELS)
def test_gate_values_come_back_from_each_forward(model_name, request, ids):
    model = randomise(add(request.getfixturevalue(model_name)))
    logits(model, ids, MASK)
    gates = unipelt.gate_values(model)
    q, v = ("query", "value") if model_name == "tiny_bert" else ("q_proj", "v_proj")
    assert set(gates) == {(layer, c) for layer in (0, 1) for c in ("prefix", "adapter", f"lora.{q}", f"lora.{v}")}
    assert all(g.shape == (3,) and ((0 < g) & (g < 1)).all() and not g.requires_grad for g in gates.values())
    logits(model, ids[:1])  # overwritten, not appended
    assert all(g.shape == (1,) for g in unipelt.gate_values(model).values())
    assert all(m.token_mask is None for m in model.modules() if isinstance(m, unipelt.Gate))


def test_deepcopy_is_independent(tiny_bert, ids):
    model = randomise(add(tiny_bert))
    copied = copy.deepcopy(model)
    for m in copied.modules():  # each attention hands the mask to its own copy's gates
        if hasattr(m, "unipelt_gates"):
            assert all(any(g is c for c in copied.modules()) for g in m.unipelt_gates)
    torch.testing.assert_close(logits(copied, ids, MASK), logits(model, ids, MASK), atol=0, rtol=0)
    logits(copied, ids[:1])
    assert all(g.shape == (3,) for g in unipelt.gate_values(model).values())


def test_generate_runs_on_llama(tiny_llama):
    """Decoding with a cache: each step's gates average over the tokens of that step (the reference,
    an encoder, never decodes; a per-sequence gate would need the cached tokens' gate inputs)."""
    model = randomise(add(tiny_llama))
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8) and torch.equal(out[:, :5], ids)
    assert all(g.shape == (2,) for g in unipelt.gate_values(model).values())


def _grads(base, checkpoint_kwargs):
    torch.manual_seed(0)
    model = add(base, adapter_init="bert", modules_to_save=["classifier"] if "Bert" in type(base).__name__ else [])
    model.train()
    if checkpoint_kwargs is not None:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.24's name
        if enable is not None:
            enable(activation_checkpointing_kwargs=checkpoint_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, attention_mask=MASK).logits.pow(2).sum().backward()
    return model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_name", MODELS)
def test_only_the_method_and_the_head_train(model_name, request):
    base = request.getfixturevalue(model_name)
    model, grads = _grads(base, None)
    want = set(unipelt.shapes(base, model.peft_config))
    heads = {"classifier.weight", "classifier.bias"} if model_name == "tiny_bert" else set()
    assert set(grads) == want | heads
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want | heads
    assert registry.count_adapter_parameters(model) == count_parameters(model)[0] - sum(
        p.numel() for n, p in model.named_parameters() if n in heads)


@pytest.mark.parametrize("model_name", MODELS)
def test_gradient_checkpointing_gives_the_same_gradients(model_name, request):
    """Non-reentrant checkpointing re-runs each layer, its mask hook included. (The reference's
    checkpointing branch silently drops the prefix: research note 3, quirk 2.)"""
    base = request.getfixturevalue(model_name)
    plain = _grads(base, None)[1]
    checkpointed = _grads(base, {"use_reentrant": False})[1]
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        assert torch.equal(plain[n], checkpointed[n]), n


@pytest.mark.parametrize("model_name", MODELS)
def test_save_load_round_trip(model_name, request, ids, tmp_path):
    base = request.getfixturevalue(model_name)
    ours = randomise(add(base, gate_pooling="mean", lora=model_name == "tiny_bert"))
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "UNIPELT"
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    heads = ["classifier"] if model_name == "tiny_bert" else []
    # the file keeps the prefix the MLP computes, not the MLP: the loaded model's prefix is flat
    assert loaded.peft_config == replace(ours.peft_config, modules_to_save=heads, prefix_projection=False)
    saved = read_adapter(tmp_path)[1]
    assert not any("transform" in k for k in saved)
    kv = prefix.KVShape.of(base)
    assert sum(t.numel() for k, t in saved.items() if "prompt_encoder" in k) == SMALL["num_virtual_tokens"] * kv.num_layers * 2 * kv.token_dim
    torch.testing.assert_close(logits(loaded, ids, MASK), logits(ours, ids, MASK), atol=1e-6, rtol=0)
    # saved again, the flat prefix is kept as it is
    save_adapter(loaded, tmp_path / "again")
    assert load_adapter(copy.deepcopy(base), tmp_path / "again").peft_config == loaded.peft_config


def test_trains_through_the_shared_loop(tiny_bert):
    from torch.utils.data import TensorDataset

    from peft_minimal.train import TrainConfig, train
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (48, 8), generator=g)
    mask = (torch.arange(8) < torch.randint(4, 9, (48, 1), generator=g)).long()
    data = TensorDataset(ids, mask, ids[:, 0] % 3)
    model = unipelt.add_unipelt(tiny_bert, UniPELTConfig(**SMALL, modules_to_save=["classifier"]))
    result = train(model, data, TrainConfig(steps=12, batch_size=16, lr=2e-2, progress=False), dev=torch.device("cpu"))
    assert sum(result.losses[-3:]) < sum(result.losses[:3])


def test_bad_configurations_are_refused(tiny_bert, ids):
    with pytest.raises(ValueError, match="at least one of"):
        UniPELTConfig(lora=False, adapter=False, prefix=False)
    with pytest.raises(ValueError, match="gate_pooling"):
        UniPELTConfig(gate_pooling="max")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        UniPELTConfig(num_virtual_tokens=0)
    structure = str(tiny_bert)
    with pytest.raises(ValueError, match="leaves no position"):  # shifted as peft: P >= BERT's 512 positions
        unipelt.add_unipelt(tiny_bert, UniPELTConfig(num_virtual_tokens=512, shift_positions=True))
    with pytest.raises(ValueError, match="matched no module"):
        unipelt.add_unipelt(tiny_bert, UniPELTConfig(target_modules=["q_proj"]))
    assert str(tiny_bert) == structure and not hasattr(tiny_bert, "peft_config")  # refused before any change
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16))
    with pytest.raises(ValueError, match="model types.*'gpt2'"):  # no Pfeiffer site (nor q/v) it knows
        unipelt.add_unipelt(gpt2, UniPELTConfig.AP())
    model = unipelt.add_unipelt(tiny_bert, UniPELTConfig.AP(**SMALL))
    for merge in (registry.merge, registry.unmerge, registry.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged.*depend on the input"):
            merge(model)
    with pytest.raises(ValueError, match="already has"):
        unipelt.add_unipelt(model, UniPELTConfig())


# --- oracle: AdapterHub `adapters` 1.3.0 (unmasked-mean gates, as the reference) ---

# Ours against AdapterHub's outputs (transformers 5 vs 4.57.6; sdpa in ours vs eager on Llama).
ORACLE_ATOL = 1e-5
RENAME = [(r"\.loras\.a\.lora_([AB])$", r".lora_\1.weight"), (r"\.loras\.a\.gate\.", ".lora_gate."),
          (r"\.output\.adapters\.a\.", ".output.LayerNorm.adapter."),  # BERT Pfeiffer: wraps the FFN's LayerNorm
          (r"\.output_adapters\.adapters\.a\.", ".mlp.adapter."), (r"adapter_down\.0\.", "adapter_down."),
          (r"\.adapter\.gate\.", ".adapter.adapter_gate."), (r"\.prefix_tuning\.prefix_gates\.a\.", ".prefix_gate."),
          (r".*\.prefix_tuning\.pool\.prefix_tunings\.a\.self_prefix\.wte\.", "prompt_encoder.embedding."),
          (r".*\.prefix_tuning\.pool\.prefix_tunings\.a\.self_prefix\.control_trans\.", "prompt_encoder.transform.")]


def our_name(key):
    for pattern, new in RENAME:
        key = re.sub(pattern, new, key)
    return key


def read(name):
    with safe_open(str(FIXTURES / name), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
        return tensors, {k: json.loads(v) for k, v in f.metadata().items()}


@pytest.fixture(scope="module", params=["bert", "llama"])
def oracle(request):
    family = request.param
    base_tensors, meta = read(f"{family}.safetensors")
    t, umeta = read(f"unipelt_{family}.safetensors")
    assert umeta["model_config"] == meta["model_config"] and torch.equal(t["input_ids"], base_tensors["input_ids"])
    # Llama eager, as the fixture: with left padding the pad positions' hidden states (rows of a fully
    # masked attention) differ between eager and sdpa, and the reference's unmasked mean reads them
    base = make_base(family, meta, base_tensors, "eager" if family == "llama" else "sdpa")
    return family, t, umeta["adapter_configs"], base, base_tensors


def make_base(family, meta, base_tensors, attn_implementation):
    model_config = {**meta["model_config"], "attn_implementation": attn_implementation}
    base = {"bert": BertForSequenceClassification, "llama": LlamaForCausalLM}[family](
        {"bert": BertConfig, "llama": LlamaConfig}[family](**model_config)).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.copy_(base_tensors[f"base.{name}"])
    return base


def oracle_model(family, t, hub, base, case, pooling):
    on = {c: case in (c, "unipelt") for c in ("lora", "adapter", "prefix")}
    prefix_hub = hub["prefix"] if case == "prefix" else hub[case]["configs"][0] if case == "unipelt" else None
    assert hub["lora"]["r"] == 4 and hub["lora"]["selfattn_lora"] and hub["lora"]["attn_matrices"] == ["q", "v"]
    assert hub["adapter"]["original_ln_before"] and hub["adapter"]["use_gating"] and hub["prefix"]["shared_gating"]
    weights = {our_name(k.removeprefix(f"adapter.{case}.")): v for k, v in t.items() if k.startswith(f"adapter.{case}.")}
    # AdapterHub's prefix embedding is hidden_size wide; ours (peft's) is the KV width, equal on BERT but
    # not with Llama's GQA: there its MLP's output, the prefix itself, goes into our flat prefix
    flat = family == "llama" and on["prefix"]
    if flat:
        e, w0, b0, w2, b2 = (weights.pop(f"prompt_encoder.{k}") for k in (
            "embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"))
        weights["prompt_encoder.embedding.weight"] = torch.tanh(e @ w0.T + b0) @ w2.T + b2
    config = UniPELTConfig(**on, r=hub["lora"]["r"], reduction_factor=hub["adapter"]["reduction_factor"],
                           non_linearity=hub["adapter"]["non_linearity"],
                           num_virtual_tokens=prefix_hub["prefix_length"] if prefix_hub else 10,
                           encoder_hidden_size=prefix_hub["bottleneck_size"] if prefix_hub else 512,
                           prefix_projection=not flat, gate_pooling=pooling)
    model = unipelt.add_unipelt(copy.deepcopy(base), config)
    params = dict(model.named_parameters())
    assert set(weights) == {n for n, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return model


def hidden_and_logits(model, ids, mask, family):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool() if family == "llama" else slice(None)  # Llama: left pads have no output
    return {"logits": out.logits[real], "hidden": out.hidden_states[-1][real]}


@pytest.mark.parametrize("case", ["lora", "adapter", "prefix", "unipelt"])
def test_matches_adapterhub_with_the_references_mean(oracle, case):
    family, t, hub, base, base_tensors = oracle
    model = oracle_model(family, t, hub, base, case, "mean")
    ours = hidden_and_logits(model, t["input_ids"], t["attention_mask"], family)
    real = t["attention_mask"].bool() if family == "llama" else slice(None)
    for key, value in ours.items():
        theirs = t[f"out.{case}.{key}"][real]
        torch.testing.assert_close(value, theirs, atol=ORACLE_ATOL, rtol=0)
        assert (theirs - base_tensors[f"out.base.{key}"][real]).abs().max() > 100 * ORACLE_ATOL  # it matters


@pytest.mark.parametrize("case", ["lora", "adapter", "prefix", "unipelt"])
def test_masked_gates_give_adapterhubs_unpadded_outputs(oracle, case):
    """Ours, on the padded batch with masked-mean gates = AdapterHub on the padded message alone."""
    family, t, hub, base, _ = oracle
    if family != "bert":
        pytest.skip("the fixture runs the unpadded row alone on BERT only (Llama's is left-padded)")
    model = oracle_model(family, t, hub, base, case, "masked")
    n = int(t["attention_mask"][1].sum())
    ours = hidden_and_logits(model, t["input_ids"], t["attention_mask"], family)
    torch.testing.assert_close(ours["logits"][1:], t[f"out.{case}.alone.logits"], atol=ORACLE_ATOL, rtol=0)
    torch.testing.assert_close(ours["hidden"][1:, :n], t[f"out.{case}.alone.hidden"], atol=ORACLE_ATOL, rtol=0)
    assert (t[f"out.{case}.alone.hidden"] - t[f"out.{case}.hidden"][1:, :n]).abs().max() > 100 * ORACLE_ATOL


def test_the_references_mean_reads_what_attention_makes_of_padding(oracle):
    """With left padding, a pad position's query sees no key: eager attention and sdpa fill that row
    differently, and an unmasked mean over tokens reads it, so the reference's gates (and AdapterHub's)
    change with the attention implementation. Masked gates never read pads: sdpa = eager."""
    family, t, hub, _, base_tensors = oracle
    if family != "llama":
        pytest.skip("BERT's fixture is right-padded without a causal mask: no fully masked rows")
    meta = read("llama.safetensors")[1]
    real = t["attention_mask"].bool()
    out = {(impl, pooling): hidden_and_logits(oracle_model(family, t, hub, make_base(family, meta, base_tensors, impl),
                                                           "lora", pooling), t["input_ids"], t["attention_mask"],
                                              family)["logits"]
           for impl in ("sdpa", "eager") for pooling in ("mean", "masked")}
    torch.testing.assert_close(out["eager", "mean"], t["out.lora.logits"][real], atol=ORACLE_ATOL, rtol=0)
    assert (out["sdpa", "mean"] - out["eager", "mean"]).abs().max() > 1e-3
    torch.testing.assert_close(out["sdpa", "masked"], out["eager", "masked"], atol=1e-6, rtol=0)


def test_adapterhubs_closed_prefix_gate_is_not_the_identity_either(oracle):
    """AdapterHub's gated prefix with its gates shut (bias -1e4): ours with the same weights and shut
    gates gives the same outputs, and both differ from the base model (the zero keys' softmax mass)."""
    family, t, hub, base, base_tensors = oracle
    model = close_gates(oracle_model(family, t, hub, base, "prefix", "mean"), "prefix_gate")
    real = t["attention_mask"].bool() if family == "llama" else slice(None)
    ours = hidden_and_logits(model, t["input_ids"], t["attention_mask"], family)
    torch.testing.assert_close(ours["hidden"], t["out.prefix_closed.hidden"][real], atol=ORACLE_ATOL, rtol=0)
    torch.testing.assert_close(ours["logits"], t["out.prefix_closed.logits"][real], atol=ORACLE_ATOL, rtol=0)
    assert (t["out.prefix_closed.hidden"][real] - base_tensors["out.base.hidden"][real]).abs().max() > 1e-3


def test_mean_gate_values_average_every_gate_over_all_batches_by_layer(tiny_bert, tokens):
    model = unipelt.add_unipelt(tiny_bert, unipelt.UniPELTConfig())
    mask = torch.ones_like(tokens)
    mask[1:, 8:] = 0
    with torch.no_grad():
        model(input_ids=tokens, attention_mask=mask)  # all four rows at once (masked means: per row)
    whole = {key: g.mean().item() for key, g in unipelt.gate_values(model).items()}
    model.train()
    means = unipelt.mean_gate_values(model, ({"input_ids": tokens[i:i + 2], "attention_mask": mask[i:i + 2]}
                                             for i in (0, 2)))
    assert model.training  # left as it was found
    assert sorted(means) == ["adapter", "lora.query", "lora.value", "prefix"]
    for component, per_layer in means.items():
        assert per_layer == pytest.approx([whole[layer, component] for layer in (0, 1)], abs=1e-6)
