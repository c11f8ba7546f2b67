"""The benchmarks' machinery, on tiny models and a fake clock (fast; no timing is asserted): the
round-robin timer, the ``all`` table and its JSON, the memory subprocess, and that each peft model
the table times against computes what ours computes."""
import copy
import json

import pytest
import torch

from peft_minimal import bench, bench_all, bench_twin, experiments

peft = pytest.importorskip("peft")

MERGEABLE = {"lora", "adalora", "ia3", "bitfit"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared CPU every op would wait at a
    barrier for a thread the scheduler has not run yet (20x slower here on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    return now


def test_interleaved_ratio_pairs_and_medians(monkeypatch):
    calls = []
    now = fake_clock(monkeypatch)

    def slow():
        calls.append("a")
        now[0] += 3.0

    def fast():
        calls.append("b")
        now[0] += 2.0
    ratio, t_a, t_b = bench.interleaved_ratio(slow, fast, reps=4, warmup=1)
    assert (ratio, t_a, t_b) == (1.5, 3.0, 2.0)
    assert calls.count("a") == calls.count("b") == 5
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # order alternates


def test_round_robin_reverses_every_other_round_and_takes_median_ratios(monkeypatch):
    now = fake_clock(monkeypatch)
    calls = []
    durations = {"a": [9, 1, 2, 1], "b": [9, 2, 4, 2], "c": [9, 4, 8, 40]}  # the first: warmup, not timed

    def runner(name):
        def fn():
            calls.append(name)
            now[0] += durations[name][calls.count(name) - 1]
        return fn
    times = bench.round_robin({name: runner(name) for name in durations}, reps=3, warmup=1)
    assert calls == ["a", "b", "c"] + ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert times == {"a": [1, 2, 1], "b": [2, 4, 2], "c": [4, 8, 40]}
    assert bench.median_ratios(times, "a") == {"a": 1.0, "b": 2.0, "c": 4.0}  # per round, then the median


@pytest.fixture
def tiny(monkeypatch, tiny_bert):
    """``experiments.prepare`` on tiny BERT (3 labels), its plain copy, and a padded batch of 4 x 10."""
    monkeypatch.setattr(experiments, "load_encoder", lambda num_labels, seed=0: (copy.deepcopy(tiny_bert), None))
    ids = torch.randint(1, 100, (4, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[3, 4:] = 0, 0
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}
    return (lambda method: experiments.prepare(method, steps=100)[0]), (lambda: copy.deepcopy(tiny_bert)), inputs


def perturbed(model):
    """Every trainable tensor moved off its init (B = 0, λ = 0, l = 1 ... would hide mistakes)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_all_covers_every_method_and_writes_the_json(tiny, monkeypatch, tmp_path, capsys):
    _, plain, inputs = tiny
    assert set(bench_all.METHODS) == set(experiments.BUILDERS)
    monkeypatch.setattr(bench_all, "encoder_and_batch", lambda batch_size, length: (plain(), inputs))
    monkeypatch.setattr(bench_all, "memory_in_subprocess",
                        lambda m, inputs, steps, adalora_steps: {"built_mib": 1.0, "peak_mib": 4.0 if m == "full" else 3.0})
    path = tmp_path / "bench.json"
    bench.main(["all", "--reps", "2", "--json", str(path)])
    data = json.loads(path.read_text())
    assert {"torch", "transformers", "peft", "python"} <= data["environment"].keys()
    assert data["device"] == "cpu" and data["threads"] >= 1 and data["reps"] == 2
    assert data["batch"] == {"batch_size": 4, "length": 10}
    assert data["targets"] == {"step_vs_peft": "<= 1.00", "merged_vs_base": "1.00 +/- 0.02"}
    assert data["base_inference_ms"] > 0
    methods = data["methods"]
    assert list(methods) == list(bench_all.METHODS)
    for m, r in methods.items():
        assert 0 < r["trainable"] < r["total"] or m == "full"
        assert r["step_ms"] > 0 and r["step_vs_full"] > 0 and r["inference_vs_base"] > 0
        assert r["memory"]["peak_vs_full"] == (1.0 if m == "full" else 0.75)
        assert ("merged_vs_base" in r) == (m in MERGEABLE)
        if m in MERGEABLE:
            assert r["merged_max_abs_logit_difference"] < 1e-5
            low, high = r["merged_vs_base_interval"]
            assert low <= r["merged_vs_base"] <= high and r["merged_verdict"] in ("met", "missed", "within noise")
        assert ("peft" in r) == (m in bench_all.PEFT_HAS)
        if m in bench_all.PEFT_HAS:
            assert r["peft"]["max_abs_logit_difference"] < 1e-5
            low, high = r["peft"]["step_ratio_interval"]
            assert 0 < low <= r["peft"]["step_ratio"] <= high and r["peft"]["verdict"] in ("met", "missed", "within noise")
    assert methods["full"]["step_vs_full"] == 1.0
    printed = capsys.readouterr().out
    assert all(m in printed for m in methods) and "step/peft (<=1.00)" in printed and "1.00+-0.02" in printed


@pytest.mark.parametrize("method", bench_all.PEFT_HAS)
def test_peft_model_computes_what_ours_computes(tiny, method):
    """Same logits, same training loss (AdaLoRA: its penalty included) and gradients at the same weights."""
    build, plain, inputs = tiny
    model = perturbed(build(method))
    assert bench_twin.max_output_difference(model, plain(), inputs) > 1e-3  # the adapter does something
    ours, theirs = bench_twin.ours(model), bench_twin.peft_twin(model, plain())
    assert bench_twin.max_output_difference(model, theirs.model, inputs) < 1e-5
    for c in (ours, theirs):
        c.model.train()
    want, got = ours.loss(inputs), theirs.loss(inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    want.backward(), got.backward()
    mine, peft_grads = dict(model.named_parameters()), bench_twin.peft_trainable(theirs.model)
    assert peft_grads.keys() == {n for n, p in mine.items() if p.requires_grad}
    for name, p in peft_grads.items():
        torch.testing.assert_close(p.grad, mine[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("method", bench_all.METHODS)
def test_merged_copy_gives_the_unmerged_outputs(tiny, method):
    build, _, inputs = tiny
    model = perturbed(build(method))
    merged = bench_all.merged_copy(model)
    if method not in MERGEABLE:
        assert merged is None
        return
    assert merged is not model
    assert bench_twin.max_output_difference(merged, model, inputs) < 1e-5


def test_memory_subprocess_reports_its_own_positive_peak():
    """A fresh process builds MiniLM with the method and takes one step on a tiny batch. Its peak is
    its own: with ``ru_maxrss`` it would report this process's 1 GiB ballast, inherited through exec."""
    inputs = {"input_ids": torch.randint(1000, 2000, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
              "labels": torch.tensor([0, 1])}
    ballast = torch.ones(2**28)  # 1 GiB, every page touched
    ours_now = bench_all._status_mib("VmRSS")
    result = bench_all.memory_in_subprocess("ia3", inputs, steps=1)
    assert result["peak_mib"] >= result["built_mib"] > 0 and result["measure"]
    if ours_now is not None:  # Linux
        assert result["measure"] == "VmHWM after the build" and result["peak_mib"] < ours_now - 512
    del ballast


def test_peak_memory_counts_the_steps_not_what_came_before(tiny):
    """In process: the peak restarts once the model is built, so a big allocation before does not count."""
    build, _, inputs = tiny
    ballast = torch.ones(2**26)  # 256 MiB, freed before the build
    del ballast
    result = bench_all.measure_memory("lora", inputs, 1, build)
    assert 0 < result["built_mib"] <= result["peak_mib"] < result["built_mib"] + 200


def test_median_interval_is_the_binomial_order_statistics():
    # n = 10: P(Bin(10, 1/2) <= 1) = 11 / 1024 <= 0.025 < P(<= 2) = 56 / 1024, so x_(2) and x_(9)
    values = [float(v) for v in (7, 3, 9, 1, 5, 10, 2, 8, 4, 6)]
    assert bench.median_interval(values) == (2.0, 9.0, 1 - 2 * 11 / 1024)
    # n = 20: P(<= 5) = 0.0207 <= 0.025 < P(<= 6) = 0.0577: x_(6) and x_(15)
    low, high, coverage = bench.median_interval([float(v) for v in range(1, 21)])
    assert (low, high) == (6.0, 15.0) and abs(coverage - 0.9586) < 1e-4
    # too few rounds for 95%: the whole range, with the coverage it really has (1 - 2 / 2^5)
    assert bench.median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0, 1 - 2 / 32)
    with pytest.raises(ValueError):
        bench.median_interval([])


def test_median_interval_covers_the_median_about_95_percent_of_the_time():
    import random
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):
        low, high, _ = bench.median_interval([rng.gauss(1.0, 0.05) for _ in range(10)])
        hits += low <= 1.0 <= high
    assert 0.96 < hits / 2000 < 0.995  # nominal 0.979 at n = 10


def test_ratio_verdict_reads_the_whole_interval():
    assert bench.ratio_verdict(0.97, 0.99, None, 1.00) == "met"
    assert bench.ratio_verdict(0.98, 1.02, None, 1.00) == "within noise"
    assert bench.ratio_verdict(1.01, 1.03, None, 1.00) == "missed"
    assert bench.ratio_verdict(0.99, 1.01, 0.98, 1.02) == "met"
    assert bench.ratio_verdict(1.00, 1.04, 0.98, 1.02) == "within noise"
    assert bench.ratio_verdict(0.90, 0.97, 0.98, 1.02) == "missed"
