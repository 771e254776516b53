"""`make save-records` / `restore-records`: a profile's records into the repository's results/ and back."""
import json

import pytest

from effllm_utils.cli import records
from effllm_utils.core import runs


@pytest.fixture
def results(tmp_path, monkeypatch):
    """results/<profile>/runs of this test in a temp folder (not the repository's)."""
    monkeypatch.setattr(records, "repo_root", lambda: tmp_path / "repo")
    return tmp_path / "repo" / "results" / "small" / "runs"


def _run(technique: str, value: float, fail: bool = False) -> runs.RunRecord:
    def fn():
        if fail:
            raise RuntimeError("out of memory, say")
        return {"metrics": {"al_s": value}}

    return runs.execute("hardware", technique, "small", {"n": 1}, fn, verbose=False, force=True)


def _older(rec: runs.RunRecord) -> runs.RunRecord:
    """`rec` as if older code had measured it (its own run id and code version), written to outputs/."""
    old = runs.RunRecord.from_json(rec.to_json())
    old.code_version, old.run_id = "0ld0c0de", rec.run_id + "0"
    runs.write_record(old)
    return old


def _saved(results):
    return sorted(p.name for p in (results / "hardware").iterdir())


def test_save_keeps_the_current_codes_records_and_restore_brings_back_what_outputs_lacks(outputs, results, capsys):
    a, b = _run("a", 1.0), _run("b", 2.0)
    _older(a)
    assert records.main(["save", "--profile", "small"]) == 0
    assert "left out 1 of other code" in capsys.readouterr().out
    assert _saved(results) == sorted([f"{a.run_id}.json", f"{b.run_id}.json"])  # the older code's is not saved
    assert runs.read_record(results / "hardware" / f"{b.run_id}.json").metrics == {"al_s": 2.0}

    # a later sitting: outputs/ lost everything but its own b (another value); restore adds a, keeps its b
    for p in runs.runs_dir("small", "hardware").iterdir():
        if p.name != f"{b.run_id}.json":
            p.unlink()
    mine = json.loads(runs.record_path("small", "hardware", b.run_id).read_text())
    mine["metrics"]["al_s"] = 3.0
    runs.record_path("small", "hardware", b.run_id).write_text(json.dumps(mine))
    assert records.restore("small") == {"restored": 1, "kept": 1, "stale": 0, "other_host": 0}
    assert runs.ok_record("small", "hardware", "a", {"n": 1}).metrics == {"al_s": 1.0}
    assert runs.ok_record("small", "hardware", "b", {"n": 1}).metrics == {"al_s": 3.0}  # outputs/ wins
    assert records.restore("small")["restored"] == 0


def test_a_failed_rerun_never_replaces_a_saved_ok_record_and_restore_replaces_a_failed_one(outputs, results):
    a = _run("a", 1.0)
    records.save("small")
    failed = _run("a", 0.0, fail=True)
    assert failed.run_id == a.run_id and failed.status == "failed"
    assert records.save("small")["kept_ok"] == 1
    assert runs.read_record(results / "hardware" / f"{a.run_id}.json").status == "ok"
    assert records.restore("small")["restored"] == 1  # outputs/ held it as failed
    assert runs.ok_record("small", "hardware", "a", {"n": 1}).metrics == {"al_s": 1.0}


def test_save_drops_older_code_only_where_its_study_has_current_records(outputs, results):
    a = _run("a", 1.0)
    records.save("small")
    runs.record_path("small", "hardware", a.run_id).unlink()  # a later sitting lost it from outputs/
    old = _older(_run("b", 2.0))
    runs.atomic_write_text(results / "hardware" / f"{old.run_id}.json", old.to_json())
    assert records.save("small") == {"saved": 1, "kept_ok": 0, "left_out": 1, "removed": 1}  # b saved, old removed
    assert _saved(results) == sorted([f"{a.run_id}.json", f"{_run('b', 2.0).run_id}.json"])  # a kept: current code


def test_a_save_of_no_current_records_is_refused_and_deletes_nothing(outputs, results, capsys):
    assert records.main(["save", "--profile", "small"]) == 2
    err = capsys.readouterr().err
    assert "no records under" in err and "EFFLLM_OUTPUTS" in err
    a = _run("a", 1.0)
    records.save("small")
    old = _older(a)
    runs.record_path("small", "hardware", a.run_id).unlink()  # outputs/ holds only another code's records
    assert records.main(["save", "--profile", "small"]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 records" in err and "0ld0c0de" in err and "checkout that runs the batch" in err
    assert _saved(results) == [f"{a.run_id}.json"] and old.run_id not in str(_saved(results))


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not a valid run record"),
    ("misplaced", "not a 'small' record at this path"),
    ("unknown study", "record of unknown study 'nostudy'"),
])
def test_a_bad_saved_file_stops_restore_before_it_writes_anything(outputs, results, capsys, bad, message):
    a = _run("a", 1.0)
    records.save("small")
    runs.runs_dir("small", "hardware").joinpath(f"{a.run_id}.json").unlink()
    path = results / "hardware" / "zz.json"  # sorts after a's record: a copy-as-you-go restore would copy a first
    if bad == "misplaced":
        path.write_text(a.to_json())
    elif bad == "unknown study":
        other = runs.RunRecord.from_json(a.to_json())
        other.study = "nostudy"
        path.write_text(other.to_json())
    else:
        path.write_text(bad)
    assert records.main(["restore", "--profile", "small"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zz.json" in err and message in err
    assert not runs.record_path("small", "hardware", a.run_id).exists()  # nothing restored


def test_restore_without_saved_records_and_from_another_host_say_so(outputs, results, capsys, monkeypatch):
    assert records.main(["restore", "--profile", "small"]) == 2
    assert "no saved records for profile 'small'" in capsys.readouterr().err
    a = _run("a", 1.0)
    records.save("small")
    runs.record_path("small", "hardware", a.run_id).unlink()
    monkeypatch.setattr(records.socket, "gethostname", lambda: "another-host")
    assert records.main(["restore", "--profile", "small"]) == 0
    assert "1 restored records were measured on another host than 'another-host'" in capsys.readouterr().err
