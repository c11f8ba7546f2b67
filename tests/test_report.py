import pytest
import torch

from peft_minimal import report
from peft_minimal.protocol import pack_correct


def run(method, seed, lr, acc, k=64, test=True, curve=(0.2, 0.5, 0.6, 0.6), steps=40):
    r = {"spec": {"method": method, "seed": seed, "lr": lr, "k": k, "r": 8, "targets": ["query", "value"]}, "steps": steps,
         "val_accuracy": max(curve), "best_step": 10 * (list(curve).index(max(curve)) + 1), "trainable": 100, "curve": [{"step": 10 * (i + 1), "val_accuracy": a}
                                                                 for i, a in enumerate(curve)]}
    if test:
        labels = [0] * 10
        r["test_accuracy"] = acc
        r["test_correct"] = pack_correct(torch.tensor([0] * int(acc * 10) + [1] * (10 - int(acc * 10))), labels)
    return r


@pytest.fixture
def record():
    runs = [run("lora", 0, 1e-3, 0.0, test=False), run("lora", 0, 3e-3, 0.6), run("lora", 0, 1e-2, 0.0, test=False),
            run("lora", 1, 3e-3, 0.7), run("lora", 2, 3e-3, 0.8),
            run("full", 0, 1e-4, 0.5), run("full", 1, 1e-4, 0.6), run("full", 2, 1e-4, 0.6, curve=(0.1, 0.2, 0.3, 0.5)),
            run("lora", 0, 3e-3, 0.1, k=16), run("lora", 0, 3e-3, 0.0, test=False, curve=(0.7,), steps=80)]
    variant = run("lora", 0, 1e-2, 0.9)
    variant["spec"]["variant"] = "mean-pool"  # another configuration: never mixed into the plain one
    runs.append(variant)
    return {"runs": {str(i): r for i, r in enumerate(runs)}}


def test_final_runs_are_the_tested_runs_of_one_configuration(record):
    runs = report.final_runs(record, method="lora", k=64)
    assert [r["spec"]["seed"] for r in runs] == [0, 1, 2] and report.accuracies(runs) == [0.6, 0.7, 0.8]
    assert report.rate_grid(record, 40, method="lora", k=64) == [(1e-3, 0.6), (3e-3, 0.6), (1e-2, 0.6)]
    assert report.accuracies(report.final_runs(record, method="lora", k=64, variant="mean-pool")) == [0.9]
    with pytest.raises(LookupError, match="still running"):
        report.final_runs(record, method="ia3")
    record["runs"]["x"] = run("lora", 1, 1e-2, 0.3)
    with pytest.raises(ValueError, match="several rates"):
        report.final_runs(record, method="lora", k=64)


def test_final_runs_never_mix_run_lengths(record):
    """A configuration run again twice as long and read on test (the GPU record's budget-2 pair) is
    another configuration: asking without ``steps`` raises, asking with it selects."""
    record["runs"]["long"] = run("full", 0, 1e-4, 0.9, steps=80)
    with pytest.raises(ValueError, match="several lengths"):
        report.final_runs(record, method="full")
    assert report.accuracies(report.final_runs(record, steps=80, method="full")) == [0.9]
    assert report.accuracies(report.final_runs(record, steps=40, method="full")) == [0.5, 0.6, 0.6]


def test_summary_paired_interval_and_table(record):
    lora, full = report.final_runs(record, method="lora", k=64), report.final_runs(record, method="full")
    row = report.summary("LoRA", lora)
    assert row["mean"] == pytest.approx(0.7) and row["std"] == pytest.approx(0.1) and row["plateaued"]
    assert not report.summary("full", full)["plateaued"]  # seed 2 was still climbing
    interval = report.paired(lora, full)
    assert interval.difference == pytest.approx(0.7 - 0.5667, abs=1e-3) and interval.n == 3
    table = report.markdown_table([row])
    assert "| LoRA | 100 | 0.003 | 0.700 ± 0.100 | 3 | yes |" in table
    probe = [{k: v for k, v in r.items() if k != "curve"} for r in lora]  # a probe has no curve
    assert report.summary("probe", probe)["plateaued"] is None
    assert report.markdown_table([report.summary("probe", probe)]).endswith("| 3 | — |")
    assert report.correct_matrix(lora, 10).sum(1).tolist() == [6, 7, 8]


def runs(*accs, n=100):
    """Seeded runs with these test accuracies on ``n`` messages (the first ones right)."""
    return [{"spec": {"seed": s}, "test_accuracy": a, "test_correct": pack_correct(
        torch.tensor([0] * round(a * n) + [1] * (n - round(a * n))), [0] * n)} for s, a in enumerate(accs)]


def test_compare_ranks_only_when_both_intervals_agree():
    # one message better on every seed: the seed interval excludes 0, 100 messages cannot
    result = report.compare("A", runs(0.51, 0.52, 0.53), "B", runs(0.50, 0.51, 0.52), n_test=100)
    assert result["by_seed"].low > 0 and not result["by_message"].excludes_zero()
    assert not result["ranked"] and result["verdict"].startswith("no difference measured at this size")
    result = report.compare("A", runs(0.1, 0.15, 0.2), "B", runs(0.9, 0.9, 0.9), n_test=100)
    assert result["ranked"] and result["verdict"].startswith("B beats A by +0.750 [")


def test_plot_intervals_draws_both_intervals_per_comparison():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [report.compare("A", runs(0.1, 0.15, 0.2), "B", runs(0.9, 0.9, 0.9), n_test=100),
               report.compare("C", runs(0.5, 0.6, 0.4), "B", runs(0.5, 0.5, 0.5), n_test=100)]
    fig, ax = plt.subplots()
    report.plot_intervals(ax, results)
    segments = [line.get_xdata() for line in ax.lines if len(line.get_xdata()) == 2 and line.get_linestyle() == "-"]
    lows_highs = sorted((float(lo), float(hi)) for lo, hi in segments)
    assert len(lows_highs) == 4  # two intervals for each comparison
    assert (results[0]["by_seed"].low, results[0]["by_seed"].high) in lows_highs
    assert [t.get_text() for t in ax.get_yticklabels()] == ["C − B", "A − B"]
    plt.close(fig)


def test_final_runs_in_reads_a_configuration_from_whichever_record_holds_it(record):
    main = {**record, "scale": {"name": "ci"}}
    chapter5 = {"scale": {"name": "ci"}, "runs": {"a": run("prefix", 0, 1e-3, 0.4), "b": run("prefix", 1, 1e-3, 0.5)}}
    assert [r["test_accuracy"] for r in report.final_runs_in([chapter5, main], method="prefix")] == [0.4, 0.5]
    assert len(report.final_runs_in([chapter5, main], method="lora", k=64)) == 3
    with pytest.raises(LookupError, match="0 of the 2 records"):
        report.final_runs_in([chapter5, main], method="prompt")
    with pytest.raises(LookupError, match="2 of the 2 records"):
        report.final_runs_in([main, main], method="full")
    with pytest.raises(ValueError, match="different protocols"):
        report.final_runs_in([chapter5, {**main, "scale": {"name": "full"}}], method="prefix")


def test_plateau_check_sets_the_tuned_run_against_one_twice_as_long(record):
    check = report.plateau_check(record, 40, method="lora", k=64)  # the fixture's 80-step run, test unread
    assert check["lr"] == 3e-3 and check["short"] == 0.6 and check["long"] == 0.7
    assert check["gain"] == pytest.approx(0.1) and (check["short_best_step"], check["long_best_step"]) == (30, 10)
    with pytest.raises(LookupError, match="still running"):
        report.plateau_check(record, 40, method="full")


def test_pareto_front_keeps_the_undominated_points_cheapest_first():
    points = {"tiny": (10, 0.40), "small": (100, 0.55), "worse and dearer": (200, 0.50),
              "big": (1000, 0.60), "same cost, lower": (1000, 0.58), "huge": (10_000, 0.60)}
    assert report.pareto_front(points) == ["tiny", "small", "big"]  # "huge" costs more for no gain
    assert report.pareto_front({"a": (1, 0.5), "b": (1, 0.5)}) == ["a", "b"]  # ties dominate nobody
    assert report.pareto_front({}) == []


def test_gap_change_pairs_four_configurations_by_seed():
    def at(*accs):
        return [{"spec": {"seed": seed}, "test_accuracy": acc} for seed, acc in enumerate(accs)]
    # the gap a - b is 0.10, 0.12, 0.08 at setting 1 and 0.02, 0.03, 0.01 at setting 2
    interval = report.gap_change(at(0.6, 0.62, 0.58), at(0.5, 0.5, 0.5), at(0.7, 0.71, 0.69), at(0.68, 0.68, 0.68))
    assert abs(interval.difference - 0.08) < 1e-12 and interval.low < 0.08 < interval.high and interval.n == 3
    assert interval.low > 0   # the per-seed changes 0.08, 0.09, 0.07 are all well above 0
    # only the seeds all four share pair
    assert report.gap_change(at(0.6, 0.6, 0.9), at(0.5, 0.5), at(0.5, 0.5), at(0.5, 0.5, 0.1)).n == 2


def test_compare_gaps_measures_a_change_only_when_both_intervals_agree():
    # the gap A - B is 0.30 at setting 1 and 0.00 at setting 2 on every seed: a change of 0.30 by both
    wide = report.compare_gaps(runs(0.8, 0.8, 0.8), runs(0.5, 0.5, 0.5), runs(0.6, 0.6, 0.6), runs(0.6, 0.6, 0.6), 100)
    assert wide["ranked"] and wide["by_seed"].difference == pytest.approx(0.3) and wide["by_message"].low > 0.15
    assert wide["by_message"].difference == pytest.approx(0.3)
    # a change of one message in 100 on every seed: the seed interval excludes 0, the messages cannot
    small = report.compare_gaps(runs(0.52, 0.53, 0.54), runs(0.5, 0.51, 0.52), runs(0.51, 0.52, 0.53),
                                runs(0.5, 0.51, 0.52), 100)
    assert small["by_seed"].low > 0 and not small["by_message"].excludes_zero() and not small["ranked"]
    # a shrinking gap: measured, below 0
    shrink = report.compare_gaps(runs(0.6, 0.6, 0.6), runs(0.6, 0.6, 0.6), runs(0.8, 0.8, 0.8), runs(0.5, 0.5, 0.5), 100)
    assert shrink["ranked"] and shrink["by_seed"].high < 0 and shrink["by_message"].high < 0


def test_unpaired_scale_is_the_half_width_of_a_difference_of_two_accuracies(record):
    assert report.unpaired_scale(0.5, 500) == pytest.approx(0.0620, abs=1e-4)  # the book's "±0.062"
    assert report.unpaired_scale(0.9, 500) < report.unpaired_scale(0.5, 500)   # narrower away from 0.5
    assert report.unpaired_scale(0.5, 2000) == pytest.approx(report.unpaired_scale(0.5, 500) / 2)
    check = report.plateau_check(record, 40, n_val=500, method="lora", k=64)
    assert check["noise"] == report.unpaired_scale(0.6, 500)  # read at the protocol-length run's accuracy
    assert "noise" not in report.plateau_check(record, 40, method="lora", k=64)
