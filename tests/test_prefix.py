"""Prefix tuning against Hugging Face peft's PREFIX_TUNING (live: peft is the oracle), on tiny
BERT (classification) and tiny Llama (GQA, causal LM): same prefix in, same outputs out."""
import copy

import pytest
import torch

from peft_minimal import load_adapter, prefix, registry, save_adapter

peft = pytest.importorskip("peft")

P = 4
MASKS = {"none": None,
         "right": torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4]),
         "left": torch.tensor([[1] * 7, [0] * 2 + [1] * 5, [0] * 4 + [1] * 3])}


def task(model):
    return "SEQ_CLS" if "Bert" in type(model).__name__ else "CAUSAL_LM"


def theirs_and_ours(base, projection, **ours_kwargs):
    """peft's prefix (N(0,1) init) and ours holding the same numbers."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type=task(base), num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=8)).eval()
    ours = prefix.add_prefix(copy.deepcopy(base), prefix.PrefixTuningConfig(
        num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=8, **ours_kwargs))
    ours.prompt_encoder.load_state_dict({k.replace("prompt_encoder.default.", ""): v
                                         for k, v in theirs.state_dict().items() if "prompt_encoder" in k})
    return theirs, ours


def peft_out(theirs, ids, mask, position_ids=None):
    """peft's outputs: Llama's logits; BERT's last hidden state and logits. With transformers >= 5.24
    peft's own SEQ_CLS forward refuses BERT ("Model does not support past key values": BertModel's
    argument is now ``cache``), so its ``_prefix_tuning_forward`` is replayed with peft's own cache."""
    if task(theirs.base_model) == "CAUSAL_LM":
        return theirs(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    model = theirs.base_model
    cache = theirs.get_prompt(ids.shape[0])
    mask = None if mask is None else torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], 1)
    out = model.bert(input_ids=ids, attention_mask=mask, cache=cache, position_ids=position_ids)
    return torch.cat([out.last_hidden_state.flatten(1), model.classifier(model.dropout(out.pooler_output))], 1)


def ours_out(ours, ids, mask, position_ids=None):
    out = ours(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
    if task(ours) == "CAUSAL_LM":
        return out.logits
    return torch.cat([out.hidden_states[-1].flatten(1), out.logits], 1)


def real(x, mask, model):
    """Llama's outputs at real tokens only (padding rows are never read)."""
    return x if mask is None or task(model) == "SEQ_CLS" else x[mask.bool()]


@pytest.mark.parametrize("padding", sorted(MASKS))
@pytest.mark.parametrize("projection", [False, True], ids=["flat", "mlp"])
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_same_outputs_as_peft(name, projection, padding, ids, request):
    base = request.getfixturevalue(name)
    theirs, ours = theirs_and_ours(base, projection)
    mask = MASKS[padding]
    want, got = real(peft_out(theirs, ids, mask), mask, base), real(ours_out(ours, ids, mask), mask, base)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (want - real(ours_out(base, ids, mask), mask, base)).abs().max() > 1e-3  # the prefix does something


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_unshifted_positions_start_at_zero(name, ids, request):
    """``shift_positions=False``: peft's prefix with the real tokens at positions 0 … L-1."""
    base = request.getfixturevalue(name)
    theirs, ours = theirs_and_ours(base, False, shift_positions=False)
    mask = MASKS["right"]
    zero = torch.arange(ids.shape[1])[None]
    if task(base) == "CAUSAL_LM":  # peft adds P to explicit positions: hand it -P so they start at 0
        want = peft_out(theirs, ids, mask, position_ids=zero - P)
    else:
        want = peft_out(theirs, ids, mask, position_ids=zero)
    torch.testing.assert_close(real(ours_out(ours, ids, mask), mask, base), real(want, mask, base), atol=1e-6, rtol=0)
    shifted = real(peft_out(theirs, ids, mask), mask, base)
    assert (shifted - real(want, mask, base)).abs().max() > 1e-3


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_padding_is_never_attended(name, padding, ids, request):
    model = prefix.add_prefix(request.getfixturevalue(name), prefix.PrefixTuningConfig(num_virtual_tokens=P))
    mask = MASKS[padding]
    other = torch.where(mask.bool(), ids, (ids + 7) % 100)
    a, b = ours_out(model, ids, mask), ours_out(model, other, mask)
    if task(model) == "SEQ_CLS":  # the real tokens' hidden states; the logits too where position 0 is real
        head = torch.full((3, 3), padding == "right")  # (BERT's pooler reads position 0, a pad when left-padded)
        keep = torch.cat([mask.bool().repeat_interleave(32, 1), head], 1)
        a, b = a[keep], b[keep]
    else:
        a, b = a[mask.bool()], b[mask.bool()]
    assert torch.equal(a, b)


@pytest.mark.parametrize("projection", [False, True], ids=["flat", "mlp"])
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_peft_loads_ours(name, projection, ids, tmp_path, request):
    base = request.getfixturevalue(name)
    fresh = copy.deepcopy(base)
    _, ours = theirs_and_ours(base, projection)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    mask = MASKS["left"]
    torch.testing.assert_close(real(peft_out(theirs, ids, mask), mask, base),
                               real(ours_out(ours, ids, mask), mask, base), atol=1e-6, rtol=0)


@pytest.mark.parametrize("projection", [False, True], ids=["flat", "mlp"])
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_we_load_peft(name, projection, ids, tmp_path, request):
    """peft saves the prefix (the MLP's output); we load it as a flat prefix, with the SEQ_CLS head."""
    base = request.getfixturevalue(name)
    theirs, _ = theirs_and_ours(base, projection)
    if task(base) == "SEQ_CLS":
        with torch.no_grad():
            theirs.base_model.classifier.modules_to_save["default"].weight.mul_(10)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert ours.peft_config == prefix.PrefixTuningConfig(
        num_virtual_tokens=P, modules_to_save=["classifier", "score"] if task(base) == "SEQ_CLS" else [])
    mask = MASKS["right"]
    torch.testing.assert_close(real(ours_out(ours, ids, mask), mask, base),
                               real(peft_out(theirs, ids, mask), mask, base), atol=1e-6, rtol=0)


def greedy(model, ids, mask, steps):
    """Greedy decoding without a cache: the whole sequence through ``model`` at every step."""
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


GENERATE = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("projection", [False, True], ids=["flat", "mlp"])
def test_generate_equals_greedy_decoding_with_peft(tiny_llama, projection, padding, ids):
    """Our ``generate`` (KV cache, prefix re-added at every step) = greedy decoding through peft's forward."""
    theirs, ours = theirs_and_ours(tiny_llama, projection)
    mask = MASKS[padding] if MASKS[padding] is not None else torch.ones_like(ids)
    got = ours.generate(input_ids=ids, attention_mask=mask, **GENERATE)
    assert torch.equal(got, greedy(theirs, ids, mask, 5))
    assert not torch.equal(got, tiny_llama.generate(input_ids=ids, attention_mask=mask, **GENERATE))


def test_generate_equals_peft_generate(tiny_llama, ids):
    theirs, ours = theirs_and_ours(tiny_llama, False)
    want = theirs.generate(input_ids=ids, **GENERATE)
    if torch.equal(want, tiny_llama.generate(input_ids=ids, **GENERATE)):
        pytest.xfail("peft 0.21.2's generate drops the prefix under transformers >= 5.24: it passes it as "
                     "past_key_values next to generate's own `cache`, and the model keeps `cache`")
    assert torch.equal(ours.generate(input_ids=ids, **GENERATE), want)


def checkpointing(model, **kwargs):
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.24's name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


@pytest.mark.parametrize("projection", [False, True], ids=["flat", "mlp"])
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_gradient_checkpointing_gives_the_same_gradients(name, projection, request):
    """peft refuses gradient checkpointing for prefix tuning; here it recomputes the same thing."""
    base = request.getfixturevalue(name)
    plain = _grads(base, projection, None)
    checkpointed = _grads(base, projection, {})
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        assert torch.equal(plain[n], checkpointed[n]), n


def _grads(base, projection, checkpoint_kwargs):
    torch.manual_seed(0)
    model = prefix.add_prefix(copy.deepcopy(base), prefix.PrefixTuningConfig(
        num_virtual_tokens=P, prefix_projection=projection,
        modules_to_save=["classifier"] if task(base) == "SEQ_CLS" else []))
    model.train()
    if checkpoint_kwargs is not None:
        checkpointing(model, **checkpoint_kwargs)
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, attention_mask=MASKS["right"]).logits.pow(2).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("projection", [False, True], ids=["flat", "mlp"])
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_only_the_prefix_and_the_head_train(name, projection, request):
    base = request.getfixturevalue(name)
    got = set(_grads(base, projection, None))
    want = set(prefix.shapes(base, prefix.PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection)))
    if task(base) == "SEQ_CLS":
        want |= {"classifier.weight", "classifier.bias"}
    assert got == want


def test_reentrant_checkpointing_with_the_mlp_is_refused_clearly(tiny_llama):
    with pytest.raises(ValueError, match="use_reentrant"):
        _grads(tiny_llama, True, {"use_reentrant": True})


def test_bad_configurations_are_refused(tiny_bert, ids):
    with pytest.raises(ValueError, match="leaves no position"):
        prefix.add_prefix(copy.deepcopy(tiny_bert), prefix.PrefixTuningConfig(num_virtual_tokens=512))
    unshifted = prefix.PrefixTuningConfig(num_virtual_tokens=512, shift_positions=False)
    prefix.add_prefix(copy.deepcopy(tiny_bert), unshifted)  # positions are not used up
    model = prefix.add_prefix(tiny_bert, prefix.PrefixTuningConfig(num_virtual_tokens=508))
    with pytest.raises(ValueError, match="exceed the model's 512 positions"):
        model(ids)
    with pytest.raises(ValueError, match="already has a prompt encoder"):
        prefix.add_prefix(model, prefix.PrefixTuningConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        registry.merge(model)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        prefix.PrefixTuningConfig(num_virtual_tokens=0)


def test_remove_prefix_gives_the_base_model_back(tiny_llama, ids):
    want = tiny_llama(ids).logits
    model = prefix.add_prefix(tiny_llama, prefix.PrefixTuningConfig(num_virtual_tokens=P))
    copied = copy.deepcopy(model)
    assert not torch.equal(model(ids).logits, want)
    assert torch.equal(copied(ids).logits, model(ids).logits)
    prefix.remove_prefix(model)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "prompt_encoder")
    torch.testing.assert_close(model(ids).logits, want, atol=0, rtol=0)


def test_zero_init_and_counts(tiny_llama):
    config = prefix.PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=8,
                                       init_weights="zero")
    model = prefix.add_prefix(tiny_llama, config)
    assert not model.prompt_encoder().any()
    d, out = 16, 2 * 2 * 16  # token_dim = 2 KV heads x head_dim 8; 2 layers x (K, V)
    assert registry.count_adapter_parameters(model) == P * d + (d * 8 + 8) + (8 * out + out)
