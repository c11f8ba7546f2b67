import pytest

from peft_minimal import count_parameters, experiments


def test_scale_from_environment(monkeypatch):
    monkeypatch.setenv("PEFT_SCALE", "full")
    assert experiments.current_scale().name == "full"
    monkeypatch.setenv("PEFT_SCALE", "huge")
    with pytest.raises(ValueError, match="PEFT_SCALE"):
        experiments.current_scale()


def test_prepare_methods():
    head, _ = experiments.prepare("head")
    assert count_parameters(head)[0] == 384 * 20 + 20
    lora8, _ = experiments.prepare("lora", r=8)
    assert count_parameters(lora8)[0] == 6 * 2 * 8 * (384 + 384) + 384 * 20 + 20
    full, _ = experiments.prepare("full")
    assert count_parameters(full)[0] == count_parameters(full)[1]
    with pytest.raises(ValueError, match="method must be one of head, full, lora, .*bitfit; got .vera."):
        experiments.prepare("vera")


# MiniLM: 6 layers, hidden 384, FFN 1536; the head 384 x 20 + 20. A bottleneck adapter is
# 2 d b + b + d with b = 384 / 16 = 24; a gate is d + 1; the prefix MLP 384 -> 512 -> 6 x 2 x 384.
ADAPTER, GATE, HEAD = 2 * 384 * 24 + 24 + 384, 384 + 1, 384 * 20 + 20
PREFIX = 10 * 384 + (384 * 512 + 512) + (512 * 4608 + 4608)
NEW_METHODS = {"pfeiffer": (6 * ADAPTER, ("adapter_",)),
               "houlsby": (12 * ADAPTER, ("adapter_",)),
               "prefix": (PREFIX, ("prompt_encoder",)),
               "prompt": (20 * 384, ("prompt_encoder",)),
               "unipelt-ap": (PREFIX + 6 * GATE + 6 * (ADAPTER + GATE), ("prompt_encoder", "prefix_gate", "adapter_")),
               "unipelt-apl": (PREFIX + 6 * GATE + 6 * (ADAPTER + GATE) + 12 * (2 * 8 * 384 + GATE),
                               ("prompt_encoder", "prefix_gate", "adapter_", "lora_")),
               # BitFit: per layer q, k, v, attention out, FFN out (384 each), FFN in (1536), 2 LayerNorms;
               # the embeddings' LayerNorm and the pooler
               "bitfit": (6 * (5 * 384 + 1536 + 2 * 384) + 384 + 384, ("bias",))}


@pytest.mark.parametrize("method", sorted(NEW_METHODS))
def test_prepare_chapter5_methods_train_only_their_parameters_and_the_head(method):
    import torch
    count, markers = NEW_METHODS[method]
    model, tokenizer = experiments.prepare(method, seed=3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n for n in trainable if n.startswith("classifier.")} == {"classifier.weight", "classifier.bias"}
    assert all(any(m in n for m in markers) for n in trainable if not n.startswith("classifier."))
    assert count_parameters(model)[0] == count + HEAD
    torch.manual_seed(99)  # seeded inside: the same seed gives the same method parameters
    again, _ = experiments.prepare(method, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    batch = tokenizer(["a short message", "and a longer one about orbits"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 20)


@pytest.mark.parametrize("method, size, count", [
    ("pfeiffer", 16, 6 * (2 * 384 * 16 + 16 + 384)), ("houlsby", 8, 12 * (2 * 384 * 8 + 8 + 384)),
    ("prompt", 7, 7 * 384)])
def test_prepare_takes_a_size_for_chapter_6s_budgets(method, size, count):
    model, _ = experiments.prepare(method, size=size)
    assert count_parameters(model)[0] == count + HEAD


def test_a_sized_prefix_saves_p_2_l_d_and_bad_sizes_are_refused(tmp_path):
    from peft_minimal.io import read_adapter, save_adapter
    model, _ = experiments.prepare("prefix", size=18)
    save_adapter(model, tmp_path)
    _, saved = read_adapter(tmp_path)
    # chapter 6's small budget: 18 virtual tokens x 2 (K, V) x 6 layers x 384 = LoRA r = 2 on all six
    assert sum(v.numel() for k, v in saved.items() if not k.startswith("classifier")) == 18 * 2 * 6 * 384 == 82_944
    with pytest.raises(ValueError, match="divide the hidden size 384"):
        experiments.prepare("pfeiffer", size=17)
    with pytest.raises(ValueError, match="size applies to"):
        experiments.prepare("lora", size=4)


def test_missing_record_says_how_to_make_it():
    with pytest.raises(FileNotFoundError, match="python -m peft_minimal.experiments nothing"):
        experiments.load_record("nothing", "ci")


def test_committed_records_are_complete():
    record = experiments.load_record("lora_rank_sweep", "ci")
    methods = sorted((run["method"], run["r"] or 0) for run in record["runs"])
    assert methods == [("full", 0), ("head", 0)] + [("lora", r) for r in (1, 2, 4, 8, 16)]
    for run in record["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0 and run["trainable"] <= run["total"]
        assert run["train_config"]["steps"] == record["scale"]["steps"]


def test_truncated_update_accuracy_cuts_each_update_to_rank_r(tiny_bert, monkeypatch):
    import torch
    W0 = experiments.encoder_matrices(tiny_bert)
    torch.manual_seed(0)
    delta = {key: torch.randn_like(w) * 0.1 for key, w in W0.items()}
    seen = {}

    def fake_accuracy(model, data):  # records the update each evaluation sees
        d = experiments.encoder_matrices(model)[(0, "query")] - W0[(0, "query")]
        seen[len(seen)] = torch.linalg.matrix_rank(d, atol=1e-4).item()
        return 0.5

    monkeypatch.setattr(experiments, "evaluate_accuracy", fake_accuracy)
    result = experiments.truncated_update_accuracy(tiny_bert, W0, delta, None, ranks=(0, 1, 4, None))
    assert list(result) == ["0", "1", "4", "full"]
    assert list(seen.values()) == [0, 1, 4, 32]
    after = experiments.encoder_matrices(tiny_bert)
    assert all(torch.allclose(after[k], W0[k] + delta[k]) for k in W0)  # left fully updated


def test_prepare_adalora_and_ia3():
    model, _ = experiments.prepare("adalora", r=2, targets=experiments.ALL_SIX, steps=80)
    config = model.peft_config
    assert (config.init_r, config.target_r, config.tinit, config.tfinal) == (3, 2, 8, 16)
    # 6 layers x (4 attention matrices 384x384 + FFN in and out 384<->1536), r (in + out + 1) each
    per_layer = 4 * (384 + 384 + 1) + 2 * (384 + 1536 + 1)
    assert count_parameters(model)[0] == 6 * 3 * per_layer + 384 * 20 + 20
    model, _ = experiments.prepare("ia3")
    assert count_parameters(model)[0] == 6 * (384 + 384 + 1536) + 384 * 20 + 20


def test_committed_records_of_later_chapters():
    update = experiments.load_record("update_rank", "ci")
    short, long = update["runs"]
    assert long["train_config"]["steps"] == 8 * short["train_config"]["steps"] == 8 * update["scale"]["steps"]
    for run in update["runs"]:
        assert set(run["truncation_accuracy"]) == {"0", "1", "2", "4", "8", "16", "32", "64", "full"}
        assert run["truncation_accuracy"]["full"] == run["accuracy"]  # the whole update is the model
        assert len(run["delta_singular_values"]) == 36


def test_adalora_ablations():
    plain, _ = experiments.prepare("adalora", r=2, targets=experiments.ALL_SIX, steps=80)
    flat, _ = experiments.prepare("adalora", r=2, targets=experiments.ALL_SIX, steps=80, variant="no-pruning")
    free, _ = experiments.prepare("adalora", r=2, targets=experiments.ALL_SIX, steps=80, variant="no-penalty")
    assert plain.peft_config.init_r == 3 and flat.peft_config.init_r == 2  # the final budget from the start
    assert flat.bert.encoder.layer[0].attention.self.query.scaling == plain.bert.encoder.layer[0].attention.self.query.scaling
    assert free.peft_config.orth_reg_weight == 0.0 < plain.peft_config.orth_reg_weight
    with pytest.raises(ValueError, match="variant"):
        experiments.prepare("adalora", r=2, steps=80, variant="no-such")


def test_mean_pooling_head_reads_the_masked_mean_of_the_tokens():
    import torch
    model, tokenizer = experiments.prepare("head", variant="mean-pool")
    assert count_parameters(model)[0] == 384 * 20 + 20 and not hasattr(model.bert.pooler, "dense")
    texts = ["a short message", "a much longer message about space shuttles and orbital mechanics"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    alone = tokenizer(texts[:1], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        hidden = model.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = model.classifier((hidden * mask).sum(1) / mask.sum(1))
        assert torch.allclose(logits, expected, atol=1e-5)
        # padding never enters the mean: the short message scores the same alone and padded
        assert torch.allclose(model(**alone).logits[0], logits[0], atol=1e-5)
    with pytest.raises(ValueError, match="mean-pool"):
        experiments.prepare("lora", variant="no-pruning")
