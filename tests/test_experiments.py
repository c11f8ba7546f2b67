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
    with pytest.raises(ValueError, match="method"):
        experiments.prepare("prompt")


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


def test_run_keys_name_every_setting_that_matters():
    spec = experiments.RunSpec("lora", lr=1e-3, k=64, r=8)
    assert spec.key() == "lora|k=64|seed=0|r=8|t=query,value|lr=0.001"
    assert experiments.RunSpec("full", lr=1e-4, r=8).key() == experiments.RunSpec("full", lr=1e-4, r=2).key()
    assert len({spec.key(), experiments.RunSpec("lora", lr=1e-3, k=64, r=4).key(),
                experiments.RunSpec("lora", lr=3e-3, k=64, r=8).key(), experiments.RunSpec("lora", lr=1e-3, k=16).key(),
                experiments.RunSpec("lora", lr=1e-3, k=64, seed=1).key()}) == 5
    assert experiments.RunSpec("probe", k=16).key() == "probe|k=16|seed=0"
    ci = experiments.PROTOCOLS["ci"]
    assert ci.key(spec) == spec.key() + f"|steps={ci.steps_for(64)}" and ci.key(experiments.RunSpec("probe")) == "probe|k=all|seed=0"


def test_tuned_runs_pick_the_rate_on_validation_then_add_seeds(tmp_path, monkeypatch, tiny_bert):
    import torch
    from peft_minimal import protocol
    from peft_minimal.record import Record
    monkeypatch.setattr(protocol, "CACHE", tmp_path)
    calls, tested = [], []

    def fake_run(spec, proto, progress=False, read_test=True, return_model=False):
        calls.append((spec.lr, spec.seed, read_test))
        run = {"spec": experiments.asdict(spec), "steps": 10, "curve": [],
               "val_accuracy": {1e-3: 0.4, 3e-3: 0.6, 1e-2: 0.5}[spec.lr], "val_loss": 1.0}
        if read_test:
            run["test_accuracy"] = 0.5
        else:
            path = experiments.state_path(proto.key(spec))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({}, path)
        return run

    monkeypatch.setattr(experiments, "run_protocol", fake_run)
    monkeypatch.setattr(experiments, "prepare", lambda *a, **k: (tiny_bert, None))
    monkeypatch.setattr(experiments, "score_on_test", lambda model, proto: tested.append(1) or {"test_accuracy": 0.7})
    record = Record.open(tmp_path / "r.json", "r", {})
    runs = experiments.tuned_runs(record, experiments.RunSpec("lora", k=16), proto=experiments.PROTOCOLS["ci"])
    # the grid never reads the test split; only the winner does, from its kept weights
    assert calls == [(1e-3, 0, False), (3e-3, 0, False), (1e-2, 0, False), (3e-3, 1, True), (3e-3, 2, True)]
    assert tested == [1] and [r["test_accuracy"] for r in runs] == [0.7, 0.5, 0.5]
    assert [r["spec"]["lr"] for r in runs] == [3e-3] * 3
    assert "test_accuracy" not in record[experiments.PROTOCOLS["ci"].key(experiments.RunSpec("lora", k=16, lr=1e-3))]
    experiments.tuned_runs(Record.open(tmp_path / "r.json", "r", {}), experiments.RunSpec("lora", k=16),
                           proto=experiments.PROTOCOLS["ci"])
    assert len(calls) == 5 and tested == [1]  # all recorded: nothing runs again


def test_a_winner_without_kept_weights_is_trained_again(tmp_path, monkeypatch, tiny_bert):
    from peft_minimal import protocol
    from peft_minimal.record import Record
    monkeypatch.setattr(protocol, "CACHE", tmp_path)
    spec = experiments.RunSpec("lora", k=16, lr=3e-3)
    record = Record.open(tmp_path / "r.json", "r", {})
    record.run(spec.key(), lambda: {"spec": experiments.asdict(spec), "steps": 10, "curve": [{"val_accuracy": 0.6}]})
    monkeypatch.setattr(experiments, "score_on_test", lambda model, proto: {"test_accuracy": 0.7})
    monkeypatch.setattr(experiments, "run_protocol", lambda s, p, progress, return_model: (
        {"curve": [{"val_accuracy": 0.6}], "test_accuracy": 0.1}, tiny_bert))
    assert experiments.finish_on_test(record, spec.key(), None)["test_accuracy"] == 0.7  # same curve: same run
    record.data["runs"][spec.key()].pop("test_accuracy")
    monkeypatch.setattr(experiments, "run_protocol", lambda s, p, progress, return_model: (
        {"curve": [{"val_accuracy": 0.5}], "test_accuracy": 0.1}, tiny_bert))
    rerun = experiments.finish_on_test(record, spec.key(), None)  # another machine: the new run replaces it
    assert rerun["test_accuracy"] == 0.1 and rerun["curve"] == [{"val_accuracy": 0.5}]


def test_protocol_steps_and_curve_spacing():
    ci = experiments.PROTOCOLS["ci"]
    for k, steps in ci.steps:
        assert ci.steps_for(k) == steps and steps // ci.eval_every(k) >= ci.evaluations


def test_a_best_rate_on_the_grid_edge_extends_the_grid(tmp_path, monkeypatch):
    from peft_minimal.record import Record
    seen = []

    def fake_run(spec, proto, progress=False, read_test=True):
        seen.append(spec.lr)  # validation accuracy keeps rising with the rate up to 0.1
        return {"spec": experiments.asdict(spec), "val_accuracy": min(spec.lr, 0.1), "val_loss": 1.0}

    monkeypatch.setattr(experiments, "run_protocol", fake_run)
    record = Record.open(tmp_path / "r.json", "r", {})
    lr = experiments.tuned_lr(record, experiments.RunSpec("lora", k=16), proto=experiments.PROTOCOLS["ci"])
    assert seen == [1e-3, 3e-3, 1e-2, 0.0333, 0.111] and lr == 0.111  # two extensions, then it stops
    seen.clear()
    monkeypatch.setattr(experiments, "run_protocol", lambda spec, proto, progress=False, read_test=True: seen.append(
        spec.lr) or {"spec": experiments.asdict(spec), "val_accuracy": 0.5 if spec.lr == 3e-3 else 0.4, "val_loss": 1.0})
    record = Record.open(tmp_path / "q.json", "q", {})
    assert experiments.tuned_lr(record, experiments.RunSpec("lora", k=16), proto=experiments.PROTOCOLS["ci"]) == 3e-3
    assert seen == [1e-3, 3e-3, 1e-2]  # an inner optimum: no extension


def test_adalora_ablations():
    spec = experiments.RunSpec("adalora", lr=1e-3, k=64, r=2, targets=experiments.ALL_SIX, variant="no-pruning")
    assert spec.key().endswith("|v=no-pruning|lr=0.001")
    plain, _ = experiments.prepare("adalora", r=2, targets=experiments.ALL_SIX, steps=80)
    flat, _ = experiments.prepare("adalora", r=2, targets=experiments.ALL_SIX, steps=80, variant="no-pruning")
    free, _ = experiments.prepare("adalora", r=2, targets=experiments.ALL_SIX, steps=80, variant="no-penalty")
    assert plain.peft_config.init_r == 3 and flat.peft_config.init_r == 2  # the final budget from the start
    assert flat.bert.encoder.layer[0].attention.self.query.scaling == plain.bert.encoder.layer[0].attention.self.query.scaling
    assert free.peft_config.orth_reg_weight == 0.0 < plain.peft_config.orth_reg_weight
    with pytest.raises(ValueError, match="variant"):
        experiments.prepare("adalora", r=2, steps=80, variant="no-such")


def test_committed_protocol_record_is_consistent():
    """Every recorded run is named by its own configuration, and every run that read the test
    split read all of it; rate-grid runs that lost kept the test split unread."""
    record = experiments.load_record("protocol", "ci")
    proto = experiments.PROTOCOLS["ci"]
    assert record["scale"] == proto.fixed()
    for key, run in record["runs"].items():
        spec = experiments.RunSpec(**{**run["spec"], "targets": tuple(run["spec"]["targets"])})
        assert key == run["key"] == proto.key(spec)
        if "test_accuracy" in run:
            assert len(run["test_correct"]) == 2 * 942 and 0.05 < run["test_accuracy"] < 1
        if spec.method != "probe":
            assert len(run["curve"]) == proto.evaluations and run["curve"][-1]["step"] == proto.steps_for(spec.k)
            assert run["best_step"] in [p["step"] for p in run["curve"]]
