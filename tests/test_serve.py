"""serve.py: one tiny BERT serving several saved adapters, each swapped in per request.

The reference for every adapter is a fresh base model with that adapter loaded by
``io.load_adapter``; the adapters are moved off their init (so that they differ from each other
and from the base model), and the test checks that they do differ, so a swap that did nothing, or
copied the wrong adapter, fails."""
import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from peft_minimal import experiments, load_adapter, lora, save_adapter, serve

# every method experiments.prepare builds (chapters 2-6), at the book's settings
METHODS = ("lora", "adalora", "ia3", "bitfit", "pfeiffer", "houlsby", "prefix", "prompt", "unipelt-apl")
NAMES = ("news", "spam", "bbc")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def build(monkeypatch, tiny_bert):
    """``build(method, seed)``: the method on tiny BERT (3 labels), every trained tensor moved off its init."""
    monkeypatch.setattr(experiments, "load_encoder", lambda num_labels, seed=0: (copy.deepcopy(tiny_bert), None))

    def make(method: str, seed: int):
        model = experiments.prepare(method, steps=100)[0]
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        return model
    return make


@pytest.fixture
def inputs():
    ids = torch.randint(1, 100, (4, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[3, 4:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def saved(build, method, tmp_path, names=NAMES) -> dict:
    return {name: save_adapter(build(method, seed), tmp_path / method / name) for seed, name in enumerate(names, 1)}


def reference_logits(base, dirs, inputs) -> dict:
    with torch.no_grad():
        return {name: load_adapter(copy.deepcopy(base), d).eval()(**inputs).logits for name, d in dirs.items()}


def gap(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("method", METHODS)
def test_each_swap_gives_that_adapters_logits_and_leaves_the_base_alone(method, build, tiny_bert, inputs, tmp_path):
    dirs = saved(build, method, tmp_path)
    want = reference_logits(tiny_bert, dirs, inputs)
    with torch.no_grad():
        base_logits = tiny_bert(**inputs).logits
    for a, b in ((0, 1), (0, 2), (1, 2)):  # the adapters differ from each other and from the base model
        assert gap(want[NAMES[a]], want[NAMES[b]]) > 1e-3
    assert all(gap(w, base_logits) > 1e-3 for w in want.values())

    server = serve.MultiAdapterModel(copy.deepcopy(tiny_bert), dirs)
    assert server.names == list(NAMES) and server.active == "news"
    base = {n: p.detach().clone() for n, p in server.model.named_parameters() if n not in server.live}
    assert base and all(not p.requires_grad for n, p in server.model.named_parameters() if n in base)
    with torch.no_grad():
        assert gap(server.model(**inputs).logits, want["news"]) <= 1e-6  # the first is active after loading
        for name in ("spam", "news", "bbc", "spam", "bbc", "news", "news", "bbc") * 3:
            assert gap(server(name, **inputs).logits, want[name]) <= 1e-6, name
            assert server.active == name
    after = dict(server.model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in base.items())  # bit for bit, after 25 swaps


def test_stored_adapters_are_copies_not_the_live_tensors(build, tiny_bert, inputs, tmp_path):
    dirs = saved(build, "lora", tmp_path)
    want = reference_logits(tiny_bert, dirs, inputs)
    server = serve.MultiAdapterModel(copy.deepcopy(tiny_bert), dirs)
    with torch.no_grad():
        for p in server.live.values():  # scribble on the live tensors of "news" ...
            p.mul_(-3.0)
        assert gap(server.model(**inputs).logits, want["news"]) > 1e-3
        server.activate("spam")
        server.activate("news")  # ... its stored copy is intact
        assert gap(server.model(**inputs).logits, want["news"]) <= 1e-6
    assert server.swap_bytes == server.adapters["news"].nbytes == sum(
        t.numel() * 4 for t in server.adapters["spam"].tensors.values())


def test_merge_serves_the_active_adapter_and_blocks_swaps(build, tiny_bert, inputs, tmp_path):
    dirs = saved(build, "ia3", tmp_path)
    want = reference_logits(tiny_bert, dirs, inputs)
    server = serve.MultiAdapterModel(copy.deepcopy(tiny_bert), dirs)
    server.activate("bbc")
    server.merge()
    assert serve.is_merged(server.model)
    with torch.no_grad():
        assert gap(server.model(**inputs).logits, want["bbc"]) < 1e-5
    with pytest.raises(RuntimeError, match="'bbc' is merged.*unmerge"):
        server.activate("news")
    assert server.active == "bbc"
    server.unmerge()
    with torch.no_grad():
        assert gap(server("news", **inputs).logits, want["news"]) <= 1e-6


def test_an_adapter_that_cannot_merge_says_so(build, tiny_bert, tmp_path):
    server = serve.MultiAdapterModel(copy.deepcopy(tiny_bert), saved(build, "pfeiffer", tmp_path, NAMES[:2]))
    with pytest.raises(ValueError, match="cannot be merged"):
        server.merge()
    server.activate("spam")  # still serving


def test_bad_inputs_are_refused_before_the_model_is_touched(build, tiny_bert, tmp_path):
    lora_dirs = saved(build, "lora", tmp_path, NAMES[:2])
    ia3_dirs = saved(build, "ia3", tmp_path, NAMES[:1])
    model = copy.deepcopy(tiny_bert)
    structure = str(model)
    with pytest.raises(ValueError, match="at least one"):
        serve.MultiAdapterModel(model, {})
    with pytest.raises(ValueError, match="share one method: 'news' is LORA, 'other' is IA3"):
        serve.MultiAdapterModel(model, {**lora_dirs, "other": ia3_dirs["news"]})
    rank4 = lora.add_lora(copy.deepcopy(tiny_bert), lora.LoRAConfig(r=4, alpha=16, target_modules=["query", "value"],
                                                                     modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match=r"differ in their config \(r\)"):
        serve.MultiAdapterModel(model, {**lora_dirs, "r4": save_adapter(rank4, tmp_path / "r4")})
    five = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=100, num_labels=5))
    lora.add_lora(five, lora.LoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match=r"shape mismatch for classifier.bias: 'news' has \(3,\), 'five' has \(5,\)"):
        serve.MultiAdapterModel(model, {**lora_dirs, "five": save_adapter(five, tmp_path / "five")})
    with pytest.raises(FileNotFoundError, match="adapter file missing"):
        serve.MultiAdapterModel(model, {"nowhere": tmp_path / "nowhere"})
    assert str(model) == structure and not hasattr(model, "peft_config")
    server = serve.MultiAdapterModel(model, lora_dirs)
    with pytest.raises(ValueError, match="no adapter named 'sports'; known: 'news', 'spam'"):
        server.activate("sports")
    assert server.active == "news"
    with pytest.raises(ValueError, match="already carries an adapter"):
        serve.MultiAdapterModel(server.model, lora_dirs)


def test_swap_seconds(build, tiny_bert, inputs, tmp_path):
    dirs = saved(build, "lora", tmp_path)
    want = reference_logits(tiny_bert, dirs, inputs)
    server = serve.MultiAdapterModel(copy.deepcopy(tiny_bert), dirs)
    seconds = serve.swap_seconds(server, ["spam", "bbc"], reps=6)
    assert 0 < seconds < 1
    assert server.active == "bbc"  # 8 calls, alternating from "spam": the last is "bbc"
    with torch.no_grad():
        assert gap(server.model(**inputs).logits, want["bbc"]) <= 1e-6
    for names in (["news"], ["news", "news"]):
        with pytest.raises(ValueError, match="two or more distinct"):
            serve.swap_seconds(server, names)
