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


def test_two_writers_of_one_record_keep_each_others_runs(tmp_path):
    path = tmp_path / "grid-ci.json"
    first, second = Record.open(path, "grid", {"steps": 5}), Record.open(path, "grid", {"steps": 5})
    first.run("a", lambda: {"value": 1})
    second.run("b", lambda: {"value": 2})  # opened before "a" was saved: its save must not drop "a"
    first.update("a", {"test_accuracy": 0.5})
    second.run("c", lambda: {"value": 3})  # holds the older "a" (without test_accuracy): the fuller one wins
    on_disk = Record.open(path, "grid", {"steps": 5})
    assert sorted(on_disk.data["runs"]) == ["a", "b", "c"]
    assert on_disk["a"]["test_accuracy"] == 0.5
    assert "a" in second  # a save also brings the other writer's runs in, so they are not run again


def test_two_writers_adding_fields_to_one_run_keep_both(tmp_path):
    path = tmp_path / "grid-ci.json"
    first = Record.open(path, "grid", {"steps": 5})
    first.run("a", lambda: {"value": 1})
    second = Record.open(path, "grid", {"steps": 5})
    first.update("a", {"test_accuracy": 0.5})
    second.update("a", {"gates": [0.1]})
    assert Record.open(path, "grid", {"steps": 5})["a"] | {"environment": None} == {
        **first["a"], "gates": [0.1], "environment": None}


def test_a_record_replaced_by_another_scale_is_not_overwritten(tmp_path):
    path = tmp_path / "grid-ci.json"
    record = Record.open(path, "grid", {"steps": 5})
    Record.open(tmp_path / "other.json", "grid", {"steps": 6}).run("b", lambda: {})
    (tmp_path / "other.json").replace(path)
    with pytest.raises(ValueError, match="not merged"):
        record.run("a", lambda: {})


def _write_runs(path, prefix, n):
    record = Record.open(path, "grid", {"steps": 5})
    for i in range(n):
        record.run(f"{prefix}{i}", lambda: {"value": i})


def test_two_processes_filling_one_record_lose_nothing(tmp_path):
    import multiprocessing

    path = tmp_path / "grid-ci.json"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_runs, args=(path, prefix, 25)) for prefix in "xy"]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=60)
    assert [w.exitcode for w in writers] == [0, 0]
    assert len(Record.open(path, "grid", {"steps": 5})) == 50
