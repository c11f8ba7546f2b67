"""Prompt tuning and P-tuning against Hugging Face peft's PROMPT_TUNING and P_TUNING (live: peft is the
oracle), on tiny BERT (classification) and tiny Llama (GQA, causal LM)."""
import copy

import pytest
import torch

from peft_minimal import load_adapter, prompt, registry, save_adapter

peft = pytest.importorskip("peft")

P = 4
MASKS = {"none": None,
         "right": torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4]),
         "left": torch.tensor([[1] * 7, [0] * 2 + [1] * 5, [0] * 4 + [1] * 3])}
KINDS = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm"]


def task(model):
    return "SEQ_CLS" if "Bert" in type(model).__name__ else "CAUSAL_LM"


def configs(kind, task_type, **ours_kwargs):
    if kind == "prompt_tuning":
        return (peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=P),
                prompt.PromptTuningConfig(num_virtual_tokens=P, **ours_kwargs))
    encoder = kind.rsplit("_", 1)[1].upper()
    return (peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=P, encoder_hidden_size=8,
                                     encoder_reparameterization_type=encoder),
            prompt.PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=8,
                                       encoder_reparameterization_type=encoder, **ours_kwargs))


def theirs_and_ours(base, kind, **ours_kwargs):
    """peft's soft prompt and ours holding the same numbers."""
    theirs_config, ours_config = configs(kind, task(base), **ours_kwargs)
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_config).eval()
    ours = prompt.add_prompt(copy.deepcopy(base), ours_config)
    ours.prompt_encoder.load_state_dict({k.replace("prompt_encoder.default.", ""): v
                                         for k, v in theirs.state_dict().items() if "prompt_encoder" in k})
    return theirs, ours


def outputs(model, ids, mask, **kwargs):
    """Llama: logits at the virtual and the real positions; BERT: last hidden states and logits."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    if out.logits.dim() == 2:  # a sequence classifier
        return torch.cat([out.hidden_states[-1].flatten(1), out.logits], 1)
    if mask is None:
        return out.logits
    return out.logits[torch.cat([torch.ones(3, P, dtype=torch.bool), mask.bool()], 1)]


@pytest.mark.parametrize("padding", sorted(MASKS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_same_outputs_as_peft(name, kind, padding, ids, request):
    base = request.getfixturevalue(name)
    theirs, ours = theirs_and_ours(base, kind)
    mask = MASKS[padding]
    want = outputs(theirs, ids, mask)
    torch.testing.assert_close(outputs(ours, ids, mask), want, atol=1e-6, rtol=0)
    plain = base(input_ids=ids, attention_mask=mask).logits
    assert (ours(input_ids=ids, attention_mask=mask).logits[:, -plain.shape[1]:] - plain).abs().max() > 1e-3


def test_token_types_and_labels_as_peft(tiny_bert, tiny_llama, ids):
    """BERT's token type ids get P zeros in front; a causal LM's labels P times -100 (the same loss)."""
    theirs, ours = theirs_and_ours(tiny_bert, "prompt_tuning")
    types = torch.cat([torch.zeros(3, 3, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(outputs(ours, ids, None, token_type_ids=types),
                               outputs(theirs, ids, None, token_type_ids=types), atol=1e-6, rtol=0)
    theirs, ours = theirs_and_ours(tiny_llama, "p_tuning_mlp")
    mask = MASKS["right"]
    labels = ids.masked_fill(mask == 0, -100)
    want = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask, labels=labels).loss, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_peft_loads_ours(name, kind, ids, tmp_path, request):
    base = request.getfixturevalue(name)
    fresh = copy.deepcopy(base)
    _, ours = theirs_and_ours(base, kind)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    mask = MASKS["left"]
    torch.testing.assert_close(outputs(theirs, ids, mask), outputs(ours, ids, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_we_load_peft(name, kind, ids, tmp_path, request):
    """peft saves the prompt (the encoder's output for P-tuning): we load it, with the SEQ_CLS head."""
    base = request.getfixturevalue(name)
    theirs, _ = theirs_and_ours(base, kind)
    if task(base) == "SEQ_CLS":
        with torch.no_grad():
            theirs.base_model.classifier.modules_to_save["default"].weight.mul_(10)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    heads = ["classifier", "score"] if task(base) == "SEQ_CLS" else []
    if kind == "prompt_tuning":
        assert ours.peft_config == prompt.PromptTuningConfig(num_virtual_tokens=P, modules_to_save=heads)
    else:
        assert ours.peft_config.inference_mode and ours.prompt_encoder.mlp_head is None
    mask = MASKS["right"]
    torch.testing.assert_close(outputs(ours, ids, mask), outputs(theirs, ids, mask), atol=1e-6, rtol=0)


def greedy(model, ids, mask, steps, positions):
    """Greedy decoding without a cache: the whole sequence through ``model`` at every step."""
    for _ in range(steps):
        kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if positions else {}
        logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


GENERATE = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning_mlp"])
def test_generate_equals_greedy_decoding(tiny_llama, kind, ids):
    """Unpadded: our ``generate`` = greedy decoding through peft's forward. Left-padded: = greedy decoding
    through ours with positions counted over real tokens, as ``generate`` gives them (peft's forward
    ignores ``position_ids``, so the pads take positions there)."""
    theirs, ours = theirs_and_ours(tiny_llama, kind)
    full = torch.ones_like(ids)
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=full, **GENERATE),
                       greedy(theirs, ids, full, 5, positions=False))
    left = MASKS["left"]
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=left, **GENERATE),
                       greedy(ours, ids, left, 5, positions=True))


def test_generate_equals_peft_generate(tiny_llama, ids):
    theirs, ours = theirs_and_ours(tiny_llama, "prompt_tuning")
    want = theirs.generate(input_ids=ids, **GENERATE)
    if not torch.equal(want, greedy(theirs, ids, torch.ones_like(ids), 5, positions=False)):
        pytest.xfail("peft 0.21.2's generate disagrees with its own forward under transformers >= 5.24: it looks "
                     "for past_key_values, generate now passes `cache`, so it re-injects the prompt at every step")
    assert torch.equal(ours.generate(input_ids=ids, **GENERATE), want)


def _grads(base, kind, checkpoint):
    torch.manual_seed(0)
    heads = ["classifier"] if task(base) == "SEQ_CLS" else []
    model = prompt.add_prompt(copy.deepcopy(base), configs(kind, task(base), modules_to_save=heads)[1])
    model.train()
    if checkpoint:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.24's name
        enable() if enable is not None else model.gradient_checkpointing_enable()
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, attention_mask=MASKS["right"]).logits.pow(2).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning_mlp"])
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_gradient_checkpointing_gives_the_same_gradients(name, kind, request):
    base = request.getfixturevalue(name)
    plain, checkpointed = _grads(base, kind, False), _grads(base, kind, True)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        assert torch.equal(plain[n], checkpointed[n]), n


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_only_the_prompt_and_the_head_train(name, kind, request):
    base = request.getfixturevalue(name)
    want = set(prompt.shapes(base, configs(kind, task(base))[1]))
    if task(base) == "SEQ_CLS":
        want |= {"classifier.weight", "classifier.bias"}
    assert set(_grads(base, kind, False)) == want


def test_sample_vocab_starts_from_word_embeddings(tiny_llama):
    config = prompt.PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="SAMPLE_VOCAB")
    model = prompt.add_prompt(tiny_llama, config)
    words = model.get_input_embeddings().weight
    for row in model.prompt_encoder():
        assert (words == row).all(1).any()


def test_bad_configurations_are_refused(tiny_llama, ids):
    model = prompt.add_prompt(tiny_llama, prompt.PromptTuningConfig(num_virtual_tokens=P))
    with pytest.raises(ValueError, match="already has a prompt encoder"):
        prompt.add_prompt(model, prompt.PromptEncoderConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        registry.merge(model)
    with pytest.raises(ValueError, match="prompt_tuning_init"):
        prompt.PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="encoder_reparameterization_type"):
        prompt.PromptEncoderConfig(encoder_reparameterization_type="GRU")
    logits = model(ids).logits
    assert logits.shape == (3, P + 7, 100)  # as peft: the virtual positions have logits too
    prompt.remove_prompt(model)
    assert model(ids).logits.shape == (3, 7, 100) and not hasattr(model, "prompt_encoder")
