import json

import pytest

from peft_minimal.record import Record


def test_runs_are_computed_once_and_saved_at_once(tmp_path):
    path = tmp_path / "grid-ci.json"
    record = Record.open(path, name="grid", scale={"steps": 5})
    calls = []
    first = record.run("a", lambda: calls.append("a") or {"accuracy": 0.5})
    assert first["accuracy"] == 0.5 and first["key"] == "a" and "torch" in first["environment"]
    on_disk = json.loads(path.read_text())  # written before the next run starts
    assert list(on_disk["runs"]) == ["a"] and on_disk["scale"] == {"steps": 5}
    assert record.run("a", lambda: pytest.fail("a recorded run is not run again")) == first
    assert calls == ["a"] and not list(tmp_path.glob("*.tmp"))


def test_a_grid_cut_off_resumes_where_it_stopped(tmp_path):
    path = tmp_path / "grid-ci.json"
    done = []

    def grid(record, crash_at=None):
        for key in ("a", "b", "c"):
            if key == crash_at:
                raise KeyboardInterrupt  # the session ends here
            record.run(key, lambda: done.append(key) or {"value": key})

    with pytest.raises(KeyboardInterrupt):
        grid(Record.open(path, "grid", {"steps": 5}), crash_at="c")
    resumed = Record.open(path, "grid", {"steps": 5})
    assert len(resumed) == 2
    grid(resumed)
    assert done == ["a", "b", "c"] and [r["value"] for r in Record.open(path, "grid", {"steps": 5}).runs()] == ["a", "b", "c"]


def test_a_record_of_another_scale_is_refused(tmp_path):
    path = tmp_path / "grid-ci.json"
    Record.open(path, "grid", {"steps": 5}).run("a", lambda: {})
    with pytest.raises(ValueError, match="scale"):
        Record.open(path, "grid", {"steps": 6})
