"""`make save-records` / `restore-records`: a profile's records into the repository's results/ and back."""
import json

import pytest

from effllm_utils.cli import records
from effllm_utils.core import runs


@pytest.fixture
def results(tmp_path, monkeypatch):
    """results/<profile>/runs of this test in a temp folder (not the repository's)."""
    monkeypatch.setattr(records, "repo_root", lambda: tmp_path / "repo")
    return tmp_path / "repo" / "results"


def _run(technique: str, value: float) -> runs.RunRecord:
    return runs.execute("hardware", technique, "small", {"n": 1}, lambda: {"metrics": {"al_s": value}}, verbose=False)


def _stale(rec: runs.RunRecord) -> runs.RunRecord:
    """`rec` as if older code had measured it (its own run id and code version)."""
    old = runs.RunRecord.from_json(rec.to_json())
    old.code_version, old.run_id = "0ld0c0de", rec.run_id + "0"
    runs.write_record(old)
    return old


def test_save_keeps_the_current_codes_records_and_restore_brings_back_what_outputs_lacks(outputs, results):
    a, b = _run("a", 1.0), _run("b", 2.0)
    stale = _stale(a)
    assert records.main(["save", "--profile", "small"]) == 0
    saved = sorted(p.name for p in (results / "small" / "runs" / "hardware").iterdir())
    assert saved == sorted([f"{a.run_id}.json", f"{b.run_id}.json"])  # the stale record is not saved
    assert runs.read_record(results / "small" / "runs" / "hardware" / f"{b.run_id}.json").metrics == {"al_s": 2.0}

    # a later sitting: outputs/ holds one record of its own (another value for b); restore adds a, keeps its b
    runs.runs_dir("small", "hardware").joinpath(f"{a.run_id}.json").unlink()
    runs.runs_dir("small", "hardware").joinpath(f"{stale.run_id}.json").unlink()
    mine = json.loads(runs.record_path("small", "hardware", b.run_id).read_text())
    mine["metrics"]["al_s"] = 3.0
    runs.record_path("small", "hardware", b.run_id).write_text(json.dumps(mine))
    assert records.restore("small") == (1, 1)
    assert runs.ok_record("small", "hardware", "a", {"n": 1}).metrics == {"al_s": 1.0}
    assert runs.ok_record("small", "hardware", "b", {"n": 1}).metrics == {"al_s": 3.0}  # outputs/ wins
    assert records.restore("small") == (0, 2)


def test_save_drops_saved_records_of_older_code_and_keeps_current_ones_outputs_lost(outputs, results):
    a = _run("a", 1.0)
    old = _stale(_run("b", 2.0))
    records.save("small")
    runs.record_path("small", "hardware", a.run_id).unlink()  # a later sitting lost it from outputs/
    assert (results / "small" / "runs" / "hardware" / f"{a.run_id}.json").exists()
    runs.atomic_write_text(results / "small" / "runs" / "hardware" / f"{old.run_id}.json", old.to_json())
    copied, removed = records.save("small")
    assert (copied, removed) == (1, 1)  # b of this code saved; the old-code record removed
    assert (results / "small" / "runs" / "hardware" / f"{a.run_id}.json").exists()  # outputs/ lost it: kept


def test_a_malformed_saved_record_and_a_missing_folder_are_one_line_each(outputs, results, capsys):
    assert records.main(["restore", "--profile", "small"]) == 2
    assert "no saved records for profile 'small'" in capsys.readouterr().err
    bad = results / "small" / "runs" / "hardware" / "broken.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    assert records.main(["restore", "--profile", "small"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "broken.json is not a run record" in err
    assert not runs.runs_dir("small").exists()  # nothing half-restored
