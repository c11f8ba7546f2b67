from peft_minimal import bench


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
