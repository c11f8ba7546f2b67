"""Gradient (activation) checkpointing with a frozen base gives the same gradients as without it.

Prefix tuning, prompt tuning and UniPELT have this test in their own files (test_prefix.py,
test_prompt.py, test_unipelt.py); here are the other methods of the registry: LoRA,
AdaLoRA, (IA)³, the bottleneck adapters and BitFit.
"""
import copy

import pytest
import torch

from peft_minimal import adalora, adapters, bitfit, ia3, lora

METHODS = {
    "lora": lambda m, head: lora.add_lora(m, lora.LoRAConfig(r=4, alpha=8, target_modules=_names(m),
                                                             modules_to_save=head)),
    "adalora": lambda m, head: adalora.add_adalora(m, adalora.AdaLoRAConfig(
        init_r=4, target_r=2, total_step=10, target_modules=_names(m), modules_to_save=head)),
    "ia3": lambda m, head: ia3.add_ia3(m, ia3.IA3Config.for_model(m, modules_to_save=head)),
    "houlsby": lambda m, head: adapters.add_adapters(m, adapters.BottleneckConfig.houlsby(
        reduction_factor=4, modules_to_save=head)),
    "parallel": lambda m, head: adapters.add_adapters(m, adapters.BottleneckConfig.parallel(
        reduction_factor=4, modules_to_save=head)),
    "bitfit": lambda m, head: bitfit.add_bitfit(m, bitfit.BitFitConfig(modules_to_save=head)),
}
NO_BIASES = {("bitfit", "tiny_llama")}  # Llama's linear layers and norms have no biases: nothing to train


def _names(model):
    return ["query", "value"] if model.config.model_type == "bert" else ["q_proj", "v_proj"]


def checkpointing(model, **kwargs):
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.24's name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def grads(base, method, checkpoint_kwargs=None):
    model = copy.deepcopy(base)
    head = ["classifier"] if model.config.model_type == "bert" else []
    torch.manual_seed(0)  # the methods' random inits
    METHODS[method](model, head)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # move every trainable tensor off its init (LoRA's B = 0 would zero A's gradient)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.train()
    if checkpoint_kwargs is not None:
        checkpointing(model, **checkpoint_kwargs)
    ids = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2]) if head else ids
    model(input_ids=ids, labels=labels).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_non_reentrant_checkpointing_gives_the_same_gradients(name, method, request):
    if (method, name) in NO_BIASES:
        pytest.skip("BitFit needs biases; the tiny Llama has none")
    base = request.getfixturevalue(name)
    plain = grads(base, method)
    checkpointed = grads(base, method, {"use_reentrant": False})
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        assert plain[n] is not None and torch.equal(plain[n], checkpointed[n]), n


@pytest.mark.parametrize("method", ["lora", "adalora"])
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_reentrant_checkpointing_gives_the_same_gradients_too(name, method, request):
    """The frozen-base pitfall (peft #1142): a reentrant checkpoint whose inputs need no grad
    returns outputs that need none, so the adapters inside it get no gradient. transformers
    (5.x) now makes the embeddings' output require grad when checkpointing is enabled, as peft's
    ``enable_input_require_grads`` did, so the reentrant form works here too."""
    base = request.getfixturevalue(name)
    plain = grads(base, method)
    checkpointed = grads(base, method, {"use_reentrant": True})
    for n in plain:
        assert checkpointed[n] is not None and torch.equal(plain[n], checkpointed[n]), n
