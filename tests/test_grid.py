"""The protocol as runs and grids (peft_minimal/runs.py, grid.py): keys, tuned rates, resumed
winners, the record."""
import pytest

from peft_minimal import experiments, grid, runs


def patch(monkeypatch, name: str, value) -> None:
    """Replace ``name`` where the grids and the runs look it up (``grid`` re-exports the run-level names)."""
    for module in (grid, runs):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, value)


def test_run_keys_name_every_setting_that_matters():
    spec = grid.RunSpec("lora", lr=1e-3, k=64, r=8)
    assert spec.key() == "lora|k=64|seed=0|r=8|t=query,value|lr=0.001"
    assert grid.RunSpec("full", lr=1e-4, r=8).key() == grid.RunSpec("full", lr=1e-4, r=2).key()
    assert len({spec.key(), grid.RunSpec("lora", lr=1e-3, k=64, r=4).key(),
                grid.RunSpec("lora", lr=3e-3, k=64, r=8).key(), grid.RunSpec("lora", lr=1e-3, k=16).key(),
                grid.RunSpec("lora", lr=1e-3, k=64, seed=1).key()}) == 5
    assert grid.RunSpec("probe", k=16).key() == "probe|k=16|seed=0"
    ci = grid.PROTOCOLS["ci"]
    assert ci.key(spec) == spec.key() + f"|steps={ci.steps_for(64)}" and ci.key(grid.RunSpec("probe")) == "probe|k=all|seed=0"


def fake_protocol_run(calls: list, entry, val_accuracy, plateaued=lambda spec: True):
    """A stand-in for ``grid.run_protocol``: appends ``entry(spec, read_test)`` to ``calls``, scores
    validation with ``val_accuracy(spec)``, flags the curve flat with ``plateaued(spec)`` and, as a
    rate-grid run does, keeps (empty) weights when it does not read the test split."""
    def fake_run(spec, proto, progress=False, read_test=True, return_model=False):
        import torch
        calls.append(entry(spec, read_test))
        run = {"spec": grid.asdict(spec), "steps": 10, "curve": [], "val_accuracy": val_accuracy(spec),
               "val_loss": 1.0, "plateaued": plateaued(spec)}
        if read_test:
            run["test_accuracy"] = 0.5
        else:
            path = grid.state_path(proto.key(spec))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({}, path)
        return run
    return fake_run


def test_tuned_runs_pick_the_rate_on_validation_then_add_seeds(tmp_path, monkeypatch, tiny_bert):
    from peft_minimal import protocol
    from peft_minimal.record import Record
    monkeypatch.setattr(protocol, "CACHE", tmp_path)
    calls, tested = [], []

    patch(monkeypatch, "run_protocol", fake_protocol_run(
        calls, lambda spec, read_test: (spec.lr, spec.seed, read_test), lambda spec: {1e-3: 0.4, 3e-3: 0.6, 1e-2: 0.5}[spec.lr]))
    patch(monkeypatch, "prepare", lambda *a, **k: (tiny_bert, None))
    patch(monkeypatch, "score_on_test", lambda model, proto: tested.append(1) or {"test_accuracy": 0.7})
    record = Record.open(tmp_path / "r.json", "r", {})
    runs = grid.tuned_runs(record, grid.RunSpec("lora", k=16), proto=grid.PROTOCOLS["ci"])
    # the grid never reads the test split; only the winner does, from its kept weights
    assert calls == [(1e-3, 0, False), (3e-3, 0, False), (1e-2, 0, False), (3e-3, 1, True), (3e-3, 2, True)]
    assert tested == [1] and [r["test_accuracy"] for r in runs] == [0.7, 0.5, 0.5]
    assert [r["spec"]["lr"] for r in runs] == [3e-3] * 3
    assert "test_accuracy" not in record[grid.PROTOCOLS["ci"].key(grid.RunSpec("lora", k=16, lr=1e-3))]
    grid.tuned_runs(Record.open(tmp_path / "r.json", "r", {}), grid.RunSpec("lora", k=16),
                           proto=grid.PROTOCOLS["ci"])
    assert len(calls) == 5 and tested == [1]  # all recorded: nothing runs again


def test_a_winner_without_kept_weights_is_trained_again(tmp_path, monkeypatch, tiny_bert):
    from peft_minimal import protocol
    from peft_minimal.record import Record
    monkeypatch.setattr(protocol, "CACHE", tmp_path)
    spec = grid.RunSpec("lora", k=16, lr=3e-3)
    record = Record.open(tmp_path / "r.json", "r", {})
    record.run(spec.key(), lambda: {"spec": grid.asdict(spec), "steps": 10, "curve": [{"val_accuracy": 0.6}]})
    patch(monkeypatch, "score_on_test", lambda model, proto: {"test_accuracy": 0.7})
    patch(monkeypatch, "run_protocol", lambda s, p, progress, return_model: (
        {"curve": [{"val_accuracy": 0.6}], "test_accuracy": 0.1}, tiny_bert))
    assert grid.finish_on_test(record, spec.key(), None)["test_accuracy"] == 0.7  # same curve: same run
    record.data["runs"][spec.key()].pop("test_accuracy")
    patch(monkeypatch, "run_protocol", lambda s, p, progress, return_model: (
        {"curve": [{"val_accuracy": 0.5}], "test_accuracy": 0.1}, tiny_bert))
    rerun = grid.finish_on_test(record, spec.key(), None)  # another machine: the new run replaces it
    assert rerun["test_accuracy"] == 0.1 and rerun["curve"] == [{"val_accuracy": 0.5}]


def test_protocol_steps_and_curve_spacing():
    ci = grid.PROTOCOLS["ci"]
    for k, steps in ci.steps:
        assert ci.steps_for(k) == steps and steps // ci.eval_every(k) >= ci.evaluations


def test_a_best_rate_on_the_grid_edge_extends_the_grid(tmp_path, monkeypatch):
    from peft_minimal.record import Record
    seen = []

    def fake_run(spec, proto, progress=False, read_test=True):
        seen.append(spec.lr)  # validation accuracy keeps rising with the rate up to 0.1
        return {"spec": grid.asdict(spec), "val_accuracy": min(spec.lr, 0.1), "val_loss": 1.0}

    patch(monkeypatch, "run_protocol", fake_run)
    record = Record.open(tmp_path / "r.json", "r", {})
    lr = grid.tuned_lr(record, grid.RunSpec("lora", k=16), proto=grid.PROTOCOLS["ci"])
    assert seen == [1e-3, 3e-3, 1e-2, 0.0333, 0.111] and lr == 0.111  # two extensions, then it stops
    seen.clear()
    patch(monkeypatch, "run_protocol", lambda spec, proto, progress=False, read_test=True: seen.append(
        spec.lr) or {"spec": grid.asdict(spec), "val_accuracy": 0.5 if spec.lr == 3e-3 else 0.4, "val_loss": 1.0})
    record = Record.open(tmp_path / "q.json", "q", {})
    assert grid.tuned_lr(record, grid.RunSpec("lora", k=16), proto=grid.PROTOCOLS["ci"]) == 3e-3
    assert seen == [1e-3, 3e-3, 1e-2]  # an inner optimum: no extension


@pytest.mark.parametrize("name", ["protocol", "gpu", "unipelt", "compare"])
def test_committed_protocol_record_is_consistent(name):
    """Every recorded run is named by its own configuration, and every run that read the test
    split read all of it; rate-grid runs that lost kept the test split unread (the CPU record,
    the GPU record, chapter 5's and chapter 6's alike)."""
    record = experiments.load_record(name, "ci")
    proto = grid.PROTOCOLS["ci"]
    assert record["scale"] == proto.fixed()
    for key, run in record["runs"].items():
        spec = grid.RunSpec(**{**run["spec"], "targets": tuple(run["spec"]["targets"])})
        longer = spec.method != "probe" and run.get("steps", 0) > proto.steps_for(spec.k)  # a probe has no steps (any K)
        run_proto = grid.doubled(proto) if longer else proto
        assert key == run["key"] == run_proto.key(spec)
        if "test_accuracy" in run:
            assert len(run["test_correct"]) == 2 * 942 and 0.05 < run["test_accuracy"] < 1
        if spec.method != "probe":
            assert len(run["curve"]) == proto.evaluations and run["curve"][-1]["step"] == run_proto.steps_for(spec.k)
            assert run["best_step"] in [p["step"] for p in run["curve"]]


def test_ablation_keys_name_the_variant():
    spec = grid.RunSpec("adalora", lr=1e-3, k=64, r=2, targets=grid.ALL_SIX, variant="no-pruning")
    assert spec.key().endswith("|v=no-pruning|lr=0.001")


def test_plateau_check_doubles_the_steps_of_the_tuned_run_without_test(tmp_path, monkeypatch):
    from peft_minimal.record import Record
    seen = []

    def fake_run(spec, proto, progress=False, read_test=True):
        seen.append((spec.lr, proto.steps_for(spec.k), read_test))
        return {"spec": grid.asdict(spec), "val_accuracy": 0.5 if spec.lr == 3e-3 else 0.4, "val_loss": 1.0}

    patch(monkeypatch, "run_protocol", fake_run)
    record = Record.open(tmp_path / "r.json", "r", {})
    ci = grid.PROTOCOLS["ci"]
    run = grid.plateau_check(record, grid.RunSpec("lora", k=64), ci)
    assert seen[-1] == (3e-3, 2 * ci.steps_for(64), False) and run["key"].endswith(f"|steps={2 * ci.steps_for(64)}")
    assert grid.plateau_check(record, grid.RunSpec("lora", k=64), ci) == run and len(seen) == 4  # recorded once


def test_truncation_cuts_the_kept_full_run_and_records_it_once(tmp_path, monkeypatch, tiny_bert):
    import copy

    import torch
    from peft_minimal import protocol
    from peft_minimal.record import Record
    monkeypatch.setattr(protocol, "CACHE", tmp_path)
    ci = grid.PROTOCOLS["ci"]
    spec = grid.RunSpec("full", k=64, lr=1e-4)
    base = copy.deepcopy(tiny_bert)
    tuned = copy.deepcopy(tiny_bert)
    with torch.no_grad():  # a "fine-tuned" model: one matrix moved by a rank-1 update
        tuned.bert.encoder.layer[1].attention.self.value.weight.add_(torch.outer(torch.ones(32), torch.arange(32.0)))
    path = grid.state_path(ci.key(spec))
    path.parent.mkdir(parents=True)
    torch.save(tuned.state_dict(), path)
    patch(monkeypatch, "tuned_lr", lambda record, spec, seed, proto: 1e-4)
    patch(monkeypatch, "prepare", lambda *a, **k: (copy.deepcopy(base), None))
    patch(monkeypatch, "protocol_data", lambda *a: (None,) * 4 + ("test",))
    patch(monkeypatch, "run_protocol", lambda *a, **k: pytest.fail("the kept weights exist"))
    monkeypatch.setattr(experiments, "truncated_update_accuracy", lambda model, W0, delta, data: {"data": data})
    truncations = Record.open(tmp_path / "t.json", "truncation", {})
    run = grid.truncation(Record.open(tmp_path / "r.json", "r", {}), truncations, grid.RunSpec("full", k=64), ci)
    assert run["of"] == ci.key(spec) and run["truncation_accuracy"] == {"data": "test"}
    spectra = run["delta_singular_values"]
    assert len(spectra) == 12 and spectra["1.value"][0] > 100 and spectra["1.value"][1] < 1e-3  # rank 1
    assert all(max(values) == 0 for name, values in spectra.items() if name != "1.value")
    assert grid.truncation(None, truncations, grid.RunSpec("full", k=64), ci) == run  # recorded: not again


def test_unipelt_grid_tunes_each_method_at_k16_then_k64_and_resumes(tmp_path, monkeypatch, tiny_bert):
    from peft_minimal import protocol
    from peft_minimal.record import Record
    monkeypatch.setattr(protocol, "CACHE", tmp_path)
    calls = []

    ci = grid.PROTOCOLS["ci"]
    rising = ("houlsby", "unipelt-apl")  # at K = 64 these two end seed 0's curve still rising
    patch(monkeypatch, "run_protocol", fake_protocol_run(
        calls, lambda spec, read_test: (spec.k, spec.method, spec.lr, spec.seed, read_test),
        lambda spec: 0.6 if spec.lr == grid.LR_GRIDS[spec.method][1] else 0.5,  # the middle of each grid wins
        lambda spec: not (spec.k == 64 and spec.method in rising)))
    patch(monkeypatch, "prepare", lambda *a, **k: (tiny_bert, None))
    patch(monkeypatch, "score_on_test", lambda model, proto: {"test_accuracy": 0.7})
    grid.unipelt_grid(ci, Record.open(tmp_path / "u.json", "unipelt", ci.fixed()))
    expected = [(k, m, lr, 0, False) for k in (16, 64) for m in grid.UNIPELT_METHODS for lr in grid.LR_GRIDS[m]]
    plateau = [(16, m, grid.LR_GRIDS[m][1], 0, False) for m in grid.UNIPELT_METHODS]  # twice the steps, K = 16
    rising64 = [(64, m, grid.LR_GRIDS[m][1], 0, False) for m in grid.UNIPELT_METHODS if m in rising]
    first_64 = len(grid.UNIPELT_METHODS) * 3
    expected = expected[:first_64] + plateau + expected[first_64:] + rising64  # K = 64: only the rising ones
    assert [c for c in calls if c[3] == 0] == expected  # K = 16 first; each method's rate grid on validation
    for k in (16, 64):
        for m in grid.UNIPELT_METHODS:  # then seeds 1 and 2 at the winning rate, read on test
            mine = [c for c in calls if c[:2] == (k, m) and c[3] > 0]
            assert mine == [(k, m, grid.LR_GRIDS[m][1], seed, True) for seed in (1, 2)]
    assert set(grid.UNIPELT_METHODS) <= set(grid.LR_GRIDS) and grid.PROTOCOL_GRIDS["unipelt"] is grid.unipelt_grid
    n = len(calls)
    grid.unipelt_grid(ci, Record.open(tmp_path / "u.json", "unipelt", ci.fixed()))  # resumed: all recorded
    assert len(calls) == n == 2 * 6 * 5 + 6 + 2


def test_run_protocol_records_unipelt_gates_and_step_time(monkeypatch, tiny_bert):
    import torch

    from peft_minimal import protocol, unipelt
    unipelt.add_unipelt(tiny_bert, unipelt.UniPELTConfig(modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)

    def data(n):
        mask = torch.ones(n, 8, dtype=torch.long)
        mask[::2, 5:] = 0  # padded rows: the recorded gates are masked means
        return torch.utils.data.TensorDataset(torch.randint(1, 100, (n, 8), generator=g), mask,
                                              torch.randint(0, 3, (n,), generator=g))

    train_set, val_set = data(8), data(6)
    patch(monkeypatch, "prepare", lambda *a, **k: (tiny_bert, None))
    patch(monkeypatch, "protocol_data", lambda *a: (None, None, None, val_set, None))
    monkeypatch.setattr(protocol, "few_shot", lambda pool, k, seed: None)
    patch(monkeypatch, "tokenize", lambda tokenizer, texts, max_length: train_set)
    tiny = grid.Protocol("tiny", max_length=8, validation_per_class=2, batch_size=4, steps=((2, 4),), evaluations=2)
    run = grid.run_protocol(grid.RunSpec("unipelt-apl", lr=1e-3, k=2), tiny, stop_at=4)
    assert sorted(run["gates"]) == ["adapter", "lora.query", "lora.value", "prefix"]
    assert all(len(v) == 2 and all(0 < x < 1 for x in v) for v in run["gates"].values())  # one mean per layer
    assert 0 < run["seconds_per_step"] <= run["train_seconds"] and "test_accuracy" not in run


def test_step_clock_takes_the_median_time_between_steps(monkeypatch):
    from peft_minimal import protocol
    ticks = iter([0.0, 1.0, 11.0, 12.5])  # a validation pass after step 2
    monkeypatch.setattr(protocol, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(ticks))}))
    clock = protocol.StepClock()
    assert clock.seconds_per_step() is None
    for step in (1, 2, 3, 4):
        clock(None, step)
    assert clock.seconds_per_step() == 1.5  # the median, not (12.5 - 0) / 3


def test_gpu_grid_replicates_at_the_cpu_rates_then_sweeps_in_its_own_record(tmp_path, monkeypatch):
    """The GPU grid's first runs use the rates the CPU record chose (so the two records can be set
    against each other seed by seed), the rank sweep uses LoRA r=8's, and a resumed grid runs nothing twice."""
    from peft_minimal import protocol
    from peft_minimal.record import Record
    monkeypatch.setattr(protocol, "CACHE", tmp_path)
    ci = grid.PROTOCOLS["ci"]
    cpu = Record.open(tmp_path / "cpu.json", "protocol", ci.fixed())
    six = grid.ALL_SIX
    for spec in (grid.RunSpec("lora", k=64, r=8, lr=3e-3), grid.RunSpec("full", k=64, lr=3e-4),
                 grid.RunSpec("head", k=64, lr=3e-2), grid.RunSpec("lora", k=64, r=2, targets=six, lr=1e-3),
                 grid.RunSpec("adalora", k=64, r=2, targets=six, lr=1e-2)):
        cpu.run(ci.key(spec), lambda spec=spec: {"spec": grid.asdict(spec), "test_accuracy": 0.5})
    seen = []

    def fake_run(spec, proto, progress=False, read_test=True):
        seen.append((spec.method, spec.r, spec.k, spec.variant, spec.lr, spec.seed, read_test, proto.steps_for(spec.k)))
        if not read_test:
            path = grid.state_path(proto.key(spec))
            path.parent.mkdir(parents=True, exist_ok=True)
            import torch
            torch.save({}, path)
        return {"spec": grid.asdict(spec), "val_accuracy": 0.5, "val_loss": 1.0, "curve": [], "steps": 10,
                **({"test_accuracy": 0.5} if read_test else {})}

    patch(monkeypatch, "run_protocol", fake_run)
    patch(monkeypatch, "open_record", lambda name, proto, directory=None: cpu)
    patch(monkeypatch, "score_on_test", lambda model, proto: {"test_accuracy": 0.5})
    patch(monkeypatch, "prepare", lambda *a, **k: (torch_module(), None))
    record = Record.open(tmp_path / "gpu.json", "gpu", ci.fixed())
    grid.gpu_grid(ci, record)
    steps = ci.steps_for(64)
    replication = [(m, r, lr) for m, r, lr in (("lora", 8, 3e-3), ("full", 8, 3e-4), ("head", 8, 3e-2),
                                               ("lora", 2, 1e-3), ("adalora", 2, 1e-2))]
    assert seen[:15] == [(m, r, 64, "", lr, seed, True, steps) for m, r, lr in replication for seed in (0, 1, 2)]
    assert seen[15:21] == [(m, r, 64, "", lr, seed, True, 2 * steps) for m, r, lr in replication[3:] for seed in (0, 1, 2)]
    assert seen[21:33] == [("lora", r, 64, "", 3e-3, seed, True, steps) for r in (1, 2, 4, 16) for seed in (0, 1, 2)]
    first16 = next(i for i, s in enumerate(seen) if s[2] == 16)
    assert {s[3] for s in seen[33:first16]} == {"mean-pool"}
    whole = next(i for i, s in enumerate(seen) if s[2] is None)
    assert {s[2] for s in seen[first16:whole]} == {16} and {s[2] for s in seen[whole:]} == {None}
    assert {s[0] for s in seen[first16:whole]} == {"probe", "lora", "head", "full", "ia3"}
    # 6: chapter 6 on the whole pool, every configuration (the papers' settings and both budgets)
    assert {s[0] for s in seen[whole:]} == {"probe", "head", "full", "lora", "ia3", "adalora", "bitfit", *grid.UNIPELT_METHODS}
    n = len(seen)
    grid.gpu_grid(ci, Record.open(tmp_path / "gpu.json", "gpu", ci.fixed()))
    assert len(seen) == n  # resumed: everything recorded


def torch_module():
    import torch
    return torch.nn.Linear(1, 1)


def test_protocol_grid_order_the_low_data_axis_after_k64_and_resume(tmp_path, monkeypatch):
    """The CPU grid finishes K = 64 (rank sweep left to the GPU record), then the probe along K,
    then K = 16 with every method's rate tuned again on validation; chapter 1's truncation runs
    only at K = 64; a resumed grid runs nothing twice."""
    from peft_minimal import protocol
    from peft_minimal.record import Record
    monkeypatch.setattr(protocol, "CACHE", tmp_path)
    ci = grid.PROTOCOLS["ci"]
    seen, truncated, doubled = [], [], []

    def fake_run(spec, proto, progress=False, read_test=True):
        seen.append((spec.method, spec.r, spec.k, spec.variant, spec.lr, spec.seed, read_test))
        if spec.method != "probe" and proto.steps_for(spec.k) != ci.steps_for(spec.k):
            doubled.append((spec.method, spec.r, spec.k, spec.variant, spec.lr, spec.seed))
        if not read_test:
            path = grid.state_path(proto.key(spec))
            path.parent.mkdir(parents=True, exist_ok=True)
            import torch
            torch.save({}, path)
        rising = spec.method == "adalora" and spec.r == 8  # only AdaLoRA at budget 8 ends its curve still rising
        return {"spec": grid.asdict(spec), "val_accuracy": 0.5 + spec.lr, "val_loss": 1.0, "curve": [], "steps": 10,
                "plateaued": not rising, **({"test_accuracy": 0.5} if read_test else {})}

    patch(monkeypatch, "run_protocol", fake_run)
    patch(monkeypatch, "truncation", lambda record, truncations, spec, proto: truncated.append(spec.k))
    patch(monkeypatch, "open_record", lambda name, proto, directory=None: None)
    patch(monkeypatch, "score_on_test", lambda model, proto: {"test_accuracy": 0.5})
    patch(monkeypatch, "prepare", lambda *a, **k: (torch_module(), None))
    grid.protocol_grid(ci, Record.open(tmp_path / "cpu.json", "protocol", ci.fixed()))
    assert truncated == [64]
    assert not [s for s in seen if s[0] == "lora" and s[2] == 64 and s[1] in (1, 4, 16)]  # no CPU rank sweep
    probes = [s[2] for s in seen if s[0] == "probe"]
    assert probes == [64] * 3 + [16] * 3 + [256] * 3 + [None]  # the K axis of the cheap baseline
    first16 = next(i for i, s in enumerate(seen) if s[2] == 16)
    assert {s[2] for s in seen[:first16]} == {64} and {s[2] for s in seen[first16:]} - {16} <= {256, None, 64}
    for method in ("lora", "head", "full", "ia3"):  # each rate grid re-run at K = 16, without reading test
        grid16 = sorted(s[4] for s in seen if s[0] == method and s[2] == 16 and not s[3] and s[5] == 0 and not s[6])
        assert grid16 and set(grid.LR_GRIDS[method]) <= set(grid16)
    budget8 = [s[:3] for s in seen[first16:] if s[2] == 64]
    assert budget8 and set(budget8) == {("lora", 8, 64), ("adalora", 8, 64)} and seen[-1][:3] == ("adalora", 8, 64)
    # the doubled runs: chapter 2's three at K = 64 and two at K = 16, then AdaLoRA at budget 8 (its curve
    # still rising), seed 0 at its tuned rate (the one its seeds 1 and 2 ran at), without test
    tuned = next(s[4] for s in seen if s[:4] == ("adalora", 8, 64, "") and s[5] == 1)
    assert doubled[-1] == ("adalora", 8, 64, "", tuned, 0) and seen[-1][-1] is False
    assert [d[:3] for d in doubled].count(("lora", 8, 64)) == 1  # LoRA r = 8 (q, v) only: all six had flattened
    n = len(seen)
    grid.protocol_grid(ci, Record.open(tmp_path / "cpu.json", "protocol", ci.fixed()))
    assert len(seen) == n


def test_compare_grid_runs_each_budget_at_k64_then_k16_and_resumes(tmp_path, monkeypatch, tiny_bert):
    from peft_minimal import protocol
    from peft_minimal.record import Record
    monkeypatch.setattr(protocol, "CACHE", tmp_path)
    calls = []
    patch(monkeypatch, "run_protocol", fake_protocol_run(
        calls, lambda spec, read_test: (spec.k, spec.method, spec.size, spec.r if spec.method in ("lora", "adalora") else None,
                                        spec.seed, read_test),
        lambda spec: 0.6 if spec.lr == grid.LR_GRIDS[spec.method][1] else 0.5))
    patch(monkeypatch, "prepare", lambda *a, **k: (tiny_bert, None))
    patch(monkeypatch, "score_on_test", lambda model, proto: {"test_accuracy": 0.7})
    ci = grid.PROTOCOLS["ci"]
    grid.compare_grid(ci, Record.open(tmp_path / "c.json", "compare", ci.fixed()))
    configs = list(dict.fromkeys(c[:4] for c in calls))
    sized = [(m, s) for m, sizes in grid.BUDGET_SIZES.items() for s in sizes]
    at64 = [(64, "bitfit", None, None)] + [(64, m, s, None) for m, s in sized]
    at16 = ([(16, "bitfit", None, None)] + [(16, m, s, None) for m, s in sized]
            + [(16, m, None, r) for r in grid.BUDGET_RANKS for m in ("lora", "adalora")])
    assert configs == at64 + at16  # K = 64 first; LoRA/AdaLoRA budgets at K = 16 only (the main grid has K = 64)
    assert all(sum(c[:4] == config for c in calls) == 5 for config in configs)  # 3 rates + 2 seeds each
    n = len(calls)
    grid.compare_grid(ci, Record.open(tmp_path / "c.json", "compare", ci.fixed()))  # resumed: all recorded
    assert len(calls) == n
    assert grid.PROTOCOL_GRIDS["compare"] is grid.compare_grid


def test_compare_grid_doubles_only_the_runs_still_rising_after_all_comparison_runs(tmp_path, monkeypatch, tiny_bert):
    from peft_minimal import protocol
    from peft_minimal.record import Record
    monkeypatch.setattr(protocol, "CACHE", tmp_path)
    calls = []

    def fake_run(spec, proto, progress=False, read_test=True, return_model=False):
        calls.append((spec.method, spec.size, spec.seed, spec.lr, proto.steps_for(spec.k), read_test))
        best = spec.lr == grid.LR_GRIDS[spec.method][1]
        return {"spec": grid.asdict(spec), "steps": proto.steps_for(spec.k), "curve": [], "val_loss": 1.0,
                "val_accuracy": 0.6 if best else 0.5, "test_accuracy": 0.5,
                "plateaued": spec.method != "bitfit"}   # BitFit's curves still rising at their end

    patch(monkeypatch, "run_protocol", fake_run)
    ci = grid.PROTOCOLS["ci"]
    grid.compare_grid(ci, Record.open(tmp_path / "c.json", "compare", ci.fixed()), ks=(64,))
    doubled = [c for c in calls if c[4] == 2 * ci.steps_for(64)]
    # one doubled run: BitFit's seed 0 at its tuned rate, on validation only, after every comparison run
    assert doubled == [("bitfit", None, 0, grid.LR_GRIDS["bitfit"][1], 2 * ci.steps_for(64), False)]
    assert calls.index(doubled[0]) == len(calls) - 1 and len(calls) == 5 * len(grid.compare_specs(64)) + 1
    n = len(calls)
    grid.compare_grid(ci, Record.open(tmp_path / "c.json", "compare", ci.fixed()), ks=(64,))  # resumed
    assert len(calls) == n


def test_run_spec_names_its_size_only_when_set():
    plain, sized = grid.RunSpec("pfeiffer", lr=1e-3, k=16), grid.RunSpec("pfeiffer", lr=1e-3, k=16, size=64)
    assert "size" not in plain.key() and "|size=64|" in sized.key()
    assert plain.key() == "pfeiffer|k=16|seed=0|lr=0.001"  # the records' keys of chapter 5 stay valid


def test_experiments_hands_every_protocol_grid_to_grid_main(monkeypatch):
    from peft_minimal import experiments
    assert set(experiments.PROTOCOL_GRID_NAMES) == set(grid.PROTOCOL_GRIDS)
    seen = []
    monkeypatch.setattr(grid, "main", lambda argv: seen.append(argv))
    for name in grid.PROTOCOL_GRIDS:
        experiments.main([name, "--scale", "ci"])
    assert seen == [[name, "--scale", "ci"] for name in grid.PROTOCOL_GRIDS]


def test_compare_specs_cover_each_k_and_the_whole_pool_adds_the_papers_settings():
    at64, at16, whole = grid.compare_specs(64), grid.compare_specs(16), grid.compare_specs(None)
    assert {s.k for s in at64} == {64} and {s.k for s in at16} == {16} and {s.k for s in whole} == {None}
    assert not [s for s in at64 if s.method in ("lora", "adalora")]  # the main grid holds them at K = 64
    assert len(at16) == len(at64) + 4
    assert [grid.replace(s, k=16) for s in whole[:len(at16)]] == at16  # the budgets first, as at K = 16
    papers = whole[len(at16):]  # AdaLoRA at budget 2 is one of the budgets already
    assert {s.method for s in papers} == {"probe", "head", "full", "lora", "ia3", *grid.UNIPELT_METHODS}
    assert {s.variant for s in papers} == {"", "mean-pool"}
    assert len({s.key() for s in whole}) == len(whole)  # nothing twice


def test_compare_grid_halves_run_one_k_each(monkeypatch):
    seen = []
    monkeypatch.setattr(grid, "tuned_runs", lambda record, spec, proto=None: seen.append(spec.k))
    monkeypatch.setattr(grid, "plateau_check_if_rising", lambda record, spec, proto: None)
    class NoRecord(list):
        path, written = "no record", ()
    monkeypatch.setattr(grid, "open_record", lambda name, proto, directory=None: NoRecord())
    grid.main(["compare", "--k", "16"])
    assert set(seen) == {16} and len(seen) == len(grid.compare_specs(16))
    seen.clear()
    grid.main(["compare"])
    assert seen == [64] * len(grid.compare_specs(64)) + [16] * len(grid.compare_specs(16))
    with pytest.raises(SystemExit):
        grid.main(["unipelt", "--k", "16"])


def test_replay_sets_the_live_curve_beside_the_recorded_one(monkeypatch):
    recorded = {"spec": {"method": "lora", "lr": 3e-3, "seed": 0, "k": 16, "r": 8, "targets": ["query", "value"]},
                "curve": [{"step": 10, "val_accuracy": 0.50, "val_loss": 2.0},
                          {"step": 20, "val_accuracy": 0.60, "val_loss": 1.5},
                          {"step": 30, "val_accuracy": 0.70, "val_loss": 1.0}]}
    seen = []

    def live_run(spec, proto, return_model, stop_at):
        seen.append((spec, stop_at))
        curve = [{"step": 10, "val_accuracy": 0.51, "val_loss": 2.02}, {"step": 20, "val_accuracy": 0.58, "val_loss": 1.5}]
        return {"curve": curve}, "the model"
    patch(monkeypatch, "run_protocol", live_run)
    out = grid.replay(recorded, grid.PROTOCOLS["ci"], stop_at=20, return_model=True)
    assert seen == [(grid.RunSpec("lora", lr=3e-3, k=16, targets=("query", "value")), 20)]
    assert [(a["step"], b["step"]) for a, b in out["pairs"]] == [(10, 10), (20, 20)]  # the live run's points only
    assert out["accuracy_gap"] == pytest.approx(0.02) and out["loss_gap"] == pytest.approx(0.01)
    assert out["model"] == "the model" and "model" not in grid.replay(recorded, grid.PROTOCOLS["ci"], stop_at=20)
