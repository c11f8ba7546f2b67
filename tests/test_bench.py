from peft_minimal import bench


def fake_clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    return now


def test_interleaved_ratio_pairs_and_medians(monkeypatch):
    calls = []
    now = [0.0]

    def fake_clock():
        return now[0]
    monkeypatch.setattr(bench.time, "perf_counter", fake_clock)

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
