import json
import os
import time

import pytest

from effllm_utils.core import aggregate, runs
from effllm_utils.report import views
from effllm_utils.studies import registry


def test_run_id_is_deterministic_and_tracks_params():
    a = runs.make_run_id("attention", "gqa", {"lr": 1e-3, "layers": 4}, scale="1M")
    assert a == runs.make_run_id("attention", "gqa", {"layers": 4, "lr": 1e-3}, scale="1M")  # key order
    assert a != runs.make_run_id("attention", "gqa", {"lr": 2e-3, "layers": 4}, scale="1M")
    assert a.startswith("attention--gqa--1M--") and "/" not in runs.make_run_id("hardware", "x", {}, "a/b c")


def test_execute_writes_skips_and_forces(outputs):
    calls = []

    def fn():
        calls.append(1)
        return {"metrics": {"al_s": 0.5, "nan_is_missing": float("nan")}, "artifacts": {"curve": [1.0, 2.0]}}

    rec = runs.execute("hardware", "t1", "tiny", {"n": 1}, fn, verbose=False)
    path = runs.record_path("tiny", "hardware", rec.run_id)
    stored = json.loads(path.read_text())
    assert stored["status"] == "ok" and stored["metrics"] == {"al_s": 0.5, "nan_is_missing": None}
    assert stored["schema_version"] == runs.SCHEMA_VERSION and "git_sha" in stored["environment"]
    assert {"torch_version", "device_name", "cpu_model", "git_dirty"} <= set(stored["environment"])
    runs.execute("hardware", "t1", "tiny", {"n": 1}, fn, verbose=False)
    assert len(calls) == 1  # skipped: the record exists
    runs.execute("hardware", "t1", "tiny", {"n": 1}, fn, force=True, verbose=False)
    assert len(calls) == 2


def test_failed_run_is_recorded_and_retried(outputs):
    def boom():
        raise RuntimeError("CUDA out of memory")

    rec = runs.execute("hardware", "t2", "tiny", {}, boom, verbose=False)
    assert rec.status == "failed" and rec.error == "RuntimeError: CUDA out of memory"
    assert "Traceback" in rec.artifacts["traceback"]
    rec = runs.execute("hardware", "t2", "tiny", {}, lambda: {"metrics": {"al_s": 1.0}}, verbose=False)
    assert rec.status == "ok"  # a failed record does not block a retry
    with pytest.raises(ValueError, match="unknown study 'atention'"):
        runs.execute("atention", "t", "tiny", {}, lambda: {}, verbose=False)
    rec = runs.execute("hardware", "t3", "tiny", {}, lambda: {"metric": {}}, verbose=False)
    assert rec.status == "failed" and "unknown section(s) ['metric']" in rec.error
    # measured before fn (side by side with other records): the seconds and environment fn hands over are kept
    made = {"metrics": {"al_s": 1.0}, "duration_s": 42.0, "environment": {"host_other_cpu_frac": 0.2, "cpu_model": "x"}}
    rec = runs.execute("hardware", "t4", "tiny", {}, lambda: made, verbose=False)
    assert rec.duration_s == 42.0 and rec.environment == made["environment"] and rec.metrics == {"al_s": 1.0}
    own = runs.execute("hardware", "t5", "tiny", {}, lambda: time.sleep(0.05) or {}, verbose=False).duration_s
    assert 0.05 <= own < 5.0  # otherwise: its own time


def test_the_previous_runs_memory_is_released_before_a_run(outputs, monkeypatch):

    events = []
    monkeypatch.setattr(runs, "release_memory", lambda: events.append("release"))
    runs.execute("hardware", "mem", "tiny", {}, lambda: events.append("fn") or {}, verbose=False)
    assert events == ["release", "fn"]


def test_out_of_memory_is_one_line_saying_what_to_change(outputs):
    import torch

    def gpu_oom():
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.20 GiB "
            "is free. Including non-PyTorch memory, this process has 77.9 GiB memory in use. If reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")

    rec = runs.execute("hardware", "oom_gpu", "tiny", {}, gpu_oom, verbose=False)
    assert rec.status == "failed" and "\n" not in rec.error
    assert rec.error.startswith("out of memory on the GPU (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
                                "a total capacity of 79.19 GiB of which 1.20 GiB is free): lower batch_size or "
                                "seq_len in params/tiny/hardware.yaml")
    rec = runs.execute("hardware", "oom_cpu", "tiny", {}, lambda: torch.empty(2**50, dtype=torch.uint8), verbose=False)
    assert rec.status == "failed" and rec.error.startswith(
        "out of memory on the CPU (tried to allocate 1,048,576.00 GiB): lower batch_size or seq_len")
    rec = runs.execute("hardware", "oom_py", "tiny", {}, lambda: (_ for _ in ()).throw(MemoryError()), verbose=False)
    assert rec.error.startswith("out of memory on the CPU (MemoryError)")
    assert runs.out_of_memory_message(RuntimeError("shape mismatch"), "attention", "tiny") is None


def test_interrupt_writes_nothing(outputs):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.execute("hardware", "t4", "tiny", {}, interrupted, verbose=False)
    folder = runs.runs_dir("tiny", "hardware")
    assert not folder.exists() or list(folder.iterdir()) == []


def test_atomic_write_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    runs.atomic_write_text(path, "old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        runs.atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_load_runs_frame_and_bad_records(outputs):
    assert aggregate.load_runs("tiny").empty
    runs.execute("hardware", "a", "tiny", {"k": [1, 2]}, lambda: {"metrics": {"al_s": 1.0}, "quality": {"ppl": 9.0}},
                 verbose=False)
    runs.execute("hardware", "b", "tiny", {}, lambda: 1 / 0, verbose=False)
    df = aggregate.load_runs("tiny")
    assert sorted(df["technique"]) == ["a", "b"] and set(df["status"]) == {"ok", "failed"}
    row = df[df.technique == "a"].iloc[0]
    assert row["al_s"] == 1.0 and row["ppl"] == 9.0 and row["param.k"] == "[1, 2]"
    assert len(aggregate.load_runs("tiny", "hardware", status="ok")) == 1
    folder = runs.runs_dir("tiny", "hardware")
    (folder / ".x.json.123.tmp").write_text("{half")  # leftover of an interrupted write: ignored
    assert len(aggregate.load_runs("tiny")) == 2
    (folder / "broken.json").write_text("{half")
    with pytest.raises(ValueError, match=r"broken\.json: not a valid run record"):
        aggregate.load_runs("tiny")
    (folder / "broken.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ValueError, match="schema version 99"):
        aggregate.load_runs("tiny")


def test_record_round_trips():
    rec = runs.RunRecord(run_id="x", study="hardware", technique="t", profile="tiny", metrics={"al_s": 1.5})
    assert runs.RunRecord.from_json(rec.to_json()) == rec
    with pytest.raises(ValueError, match=r"unknown run record field\(s\) \['extra'\]"):
        runs.RunRecord.from_json(json.dumps(json.loads(rec.to_json()) | {"extra": 1}))


def test_atomic_dir_publishes_only_complete_folders(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="crash"):
        with runs.atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []  # no target, no partial left
    with runs.atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("whole")
    assert (target / "model.safetensors").read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with runs.atomic_dir(target) as tmp:  # a second writer of the same checkpoint (another job): the first is kept
        (tmp / "model.safetensors").write_text("second")
    assert (target / "model.safetensors").read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def _record(study, technique, started, seed=0, scale="s", **params):
    p = {"seed": seed, **params}
    return runs.RunRecord(run_id=runs.make_run_id(study, technique, p, scale), study=study, technique=technique,
                          profile="tiny", scale=scale, params=p, quality={"ppl": started},
                          started_at=f"2026-01-0{started}")


def test_current_keeps_the_newest_settings_and_their_repeats(outputs):
    """A re-run with other params supersedes older records in tables (no duplicate rows); seeds stay repeats."""

    old = _record("attention", "gqa", 1, lr=0.1)
    new, new_seed = _record("attention", "gqa", 2, lr=0.2), _record("attention", "gqa", 3, seed=1, lr=0.2)
    other = _record("attention", "mqa", 1, lr=0.1)  # only ever run with the old settings: still shown
    assert aggregate.current([old, new, other, new_seed], ()) == [new, other, new_seed]
    # peft varies the dataset per run (its registry grouping): each dataset is its own row
    a, b = _record("peft", "lora", 1, dataset="alpaca"), _record("peft", "lora", 2, dataset="milton")
    assert registry.get("peft").group_by == ("dataset",)
    assert aggregate.current([a, b], ("dataset",)) == [a, b] and aggregate.current([a, b], ()) == [b]
    for r in (old, new, other, new_seed):
        runs.write_record(r)
    t = views.pretraining_table("tiny", "attention")  # gqa's two seeds: one row, their mean, over 2 runs
    assert sorted(zip(t["technique"], t["PPL"], t["runs"])) == [("gqa", 2.5, 2), ("mqa", 1, 1)]
    se = t.set_index("technique")["PPL s.e."]
    assert se["gqa"] == 0.5 and se.isna()["mqa"]
    assert len(aggregate.load_runs("tiny", "attention")) == 4  # all stay on disk and in the raw listing
    assert [r.run_id for r in registry.current("tiny", "attention")] == sorted([new.run_id, new_seed.run_id,
                                                                                  other.run_id])


def test_mean_repeats_averages_seeds_into_one_record():
    """Repeats (same settings, other seeds) become one display record: numeric metrics and quality averaged, their
    standard error in artifacts, equal values (sizes) and text kept, loss curves averaged; single runs untouched."""
    a = _record("attention", "gqa", 1, seed=0)
    b = _record("attention", "gqa", 2, seed=1)
    c = _record("attention", "gqa", 3, seed=2)
    for r, ppl, al, curve in ((a, 10.0, 0.2, [4.0, 3.0]), (b, 12.0, 0.4, [5.0, 2.0]), (c, 14.0, None, [3.0, 1.0])):
        r.quality = {"ppl": ppl}
        r.metrics = {"params": 1000, "al_s": al, "aec_w": None, "device": "cpu"}
        r.artifacts = {"loss_curve": curve, "note": r.run_id}
    single = _record("attention", "mqa", 1)
    out = aggregate.mean_repeats([a, single, b, c], ())
    assert [r.technique for r in out] == ["gqa", "mqa"] and out[1] is single
    m = out[0]
    assert m.quality["ppl"] == 12.0 and m.metrics["params"] == 1000 and isinstance(m.metrics["params"], int)
    assert m.metrics["al_s"] == pytest.approx(0.3)  # the mean of the runs that measured it
    assert m.metrics["aec_w"] is None and m.metrics["device"] == "cpu"
    assert m.artifacts["loss_curve"] == [4.0, 2.0] and m.artifacts["note"] == c.run_id  # the newest's artifacts
    rep = m.artifacts["repeats"]
    assert rep["n"] == 3 and rep["seeds"] == [0, 1, 2] and rep["run_ids"] == [a.run_id, b.run_id, c.run_id]
    assert rep["se"]["ppl"] == pytest.approx(2.0 / 3 ** 0.5) and rep["se"]["al_s"] == pytest.approx(0.1)
    assert rep["se"]["params"] == 0.0 and "aec_w" not in rep["se"]  # no spread is 0; not measured has none
    assert a.quality["ppl"] == 10.0 and "repeats" not in c.artifacts  # the records themselves are not changed
    rows = aggregate.table_rows(out, ("ppl",))
    assert (rows[0]["runs"], rows[1]["runs"], rows[1]["ppl_se"]) == (3, 1, None)
    assert "runs" not in aggregate.table_rows([single], ("ppl",))[0]  # no repeats: no extra columns


def test_study_tables_show_one_row_per_repeated_experiment(outputs):
    """peft, vlm and lvm tables too: two seeds of a method are one row with its mean and standard error."""

    def rec(study, technique, scale, seed, loss, **params):
        r = _record(study, technique, 1 + seed, seed=seed, scale=scale, **params)
        r.quality = {"loss": loss, "fid": 10 + loss, "fid_real_vs_real": 1.0, "digit_acc": 0.5}
        r.metrics = {"amu_gb": 1.0, "pcu": 0.5, "al_s": 0.1 + seed / 100, "st": 1e-5, "aec_w": None, "tt": 1e-3,
                     "trainable_params": 10}
        return r

    for seed, loss in ((0, 2.0), (1, 3.0)):
        for study, scale in (("peft", "tiny-base"), ("vlm", "tiny-vlm"), ("lvm", "tiny"), ("lvm", "tiny-ft")):
            runs.write_record(rec(study, "lora", scale, seed, loss, **({"dataset": "milton"} if study == "peft"
                                                                        else {})))
        runs.write_record(rec("peft", "full", "tiny-base", seed, loss + 1, dataset="milton"))
    p = views.peft_table("tiny")
    assert list(p["method"]) == ["full", "lora"] and list(p["eval loss"]) == [3.5, 2.5] and list(p["runs"]) == [2, 2]
    assert p["eval loss s.e."].tolist() == [0.5, 0.5] and p["efficiency score"].notna().all()
    # an LR sweep's point: listed with its LR, without an efficiency score, and out of the others' scores and figures
    point = rec("peft", "lora", "tiny-base lr=0.003", 1000, 9.0, dataset="milton", lr_adapter=0.003, lr_full=1e-4)
    point.artifacts = {"lr_sweep_point": True}
    runs.write_record(point)
    q = views.peft_table("tiny")
    swept = q["model"] == "tiny-base lr=0.003"
    assert len(q) == 3 and q.loc[swept, "LR"].tolist() == [0.003] and q.loc[swept, "efficiency score"].isna().all()
    assert q.loc[~swept, "efficiency score"].tolist() == p["efficiency score"].tolist()
    assert views.peft_table("tiny", sweep_points=False)["model"].tolist() == ["tiny-base", "tiny-base"]
    v = views.vlm_table("tiny")
    assert len(v) == 1 and (v["eval loss"][0], v["runs"][0], v["eval loss s.e."][0]) == (2.5, 2, 0.5)
    t = views.lvm_tables("tiny")
    assert (t["lvm"]["digits-FID"][0], t["lvm"]["digits-FID s.e."][0], t["lvm"]["runs"][0]) == (12.5, 0.5, 2)
    assert len(t["lvm_peft"]) == 1 and t["lvm_peft"]["loss"][0] == 2.5 and "PCU" in t["lvm_peft"]


def test_lr_sweep_selects_at_its_own_seed_and_measures_at_the_reported_one(outputs):
    """engine.sweep.at_best_lr: the sweep trains at lr_sweep_seed only, the record is a fresh run at the reported seed
    (never the sweep's best point copied: that pick is optimistic), a sweep seed among the reported seeds is refused,
    and a technique whose every sweep point fails gets a failed record instead of stopping the study."""
    from effllm_utils.engine import sweep

    calls = []
    loss = {0.01: 3.0, 0.1: 2.0, 1.0: 5.0}  # the sweep's metric by LR; seed 0 runs add 0.5

    def train_at(lr, seed):
        def fn():
            calls.append((round(lr, 6), seed))
            return {"quality": {"loss": loss[round(lr, 6)] + (0.5 if seed == 0 else 0.0)}}
        return fn

    params = {"lr": 0.1, "seed": 0}
    rec = sweep.at_best_lr("attention", "gqa", "tiny", params, "lr", train_at, "micro", "loss", points=3,
                           factor=10.0, sweep_seed=7)
    assert calls == [(0.01, 7), (0.1, 7), (1.0, 7), (0.1, 0)]
    assert rec.status == "ok" and rec.params["lr"] == 0.1 and rec.params["seed"] == 0
    assert rec.quality["loss"] == 2.5  # the seed-0 run's own value, not the sweep's minimum (2.0)
    assert rec.artifacts["lr_sweep"] == {"metric": "loss", "values": {"0.01": 3.0, "0.1": 2.0, "1": 5.0},
                                         "best": 0.1, "seed": 7}
    with pytest.raises(ValueError, match="lr_sweep_seed 0 is also a reported seed"):
        sweep.at_best_lr("attention", "gqa", "tiny", params, "lr", train_at, "micro", "loss", points=3, sweep_seed=0)

    def fails(lr, seed):
        def fn():
            raise FloatingPointError(f"loss is nan at lr {lr:.3g}")
        return fn

    rec = sweep.at_best_lr("attention", "mla", "tiny", params, "lr", fails, "micro", "loss", points=3,
                           factor=10.0, sweep_seed=7)
    assert rec.status == "failed" and rec.technique == "mla" and rec.scale == "micro"
    assert "mla: no point of the LR sweep finished (lr=0.01: FloatingPointError: loss is nan at lr 0.01;" in rec.error
    assert runs.load_records("tiny", "attention")  # the failures are on disk, each sweep point's and the technique's
    assert sorted(r.scale for r in runs.load_records("tiny", "attention") if r.technique == "mla") == [
        "micro", "micro lr=0.01", "micro lr=0.1", "micro lr=1"]


def test_a_diverged_sweep_point_is_a_measurement_and_force_redoes_a_sweep_once_per_batch(outputs, monkeypatch):
    """A sweep point whose loss diverges (TrainingDiverged) is an ok record with an infinite metric, so resuming or
    another seed does not train it again; under `reproduce --force` (which sets $EFFLLM_BATCH_STARTED) the first
    seed retrains the sweep and the later seeds reuse it; the technique's record names the sweep's seed."""
    import datetime as dt

    from effllm_utils.engine import sweep
    from effllm_utils.engine.train import TrainingDiverged

    calls = []

    def train_at(lr, seed):
        def fn():
            calls.append((round(lr, 6), seed))
            if lr > 0.5:
                raise TrainingDiverged(f"loss became nan at step 3 (lr {lr:.2e})")
            return {"quality": {"loss": 1.0 + lr + seed / 100}}
        return fn

    def at(seed, force=False):
        return sweep.at_best_lr("attention", "gqa", "tiny", {"lr": 0.1, "seed": seed}, "lr", train_at, "micro", "loss",
                                force, points=3, factor=10.0, sweep_seed=7)

    rec = at(0)
    assert calls == [(0.01, 7), (0.1, 7), (1.0, 7), (0.01, 0)] and rec.params["lr"] == pytest.approx(0.01)
    assert rec.params["lr_sweep"] == [3, 10.0, 7] and rec.artifacts["lr_sweep"]["values"]["1"] is None
    (diverged,) = [r for r in runs.load_records("tiny", "attention") if r.scale == "micro lr=1"]
    assert diverged.status == "ok" and "loss became nan" in diverged.artifacts["diverged"] and not diverged.quality
    calls.clear()
    at(1)
    assert calls == [(0.01, 1)]  # the sweep, diverged point included, is reused
    calls.clear()
    monkeypatch.setenv(runs.BATCH_STARTED_ENV, dt.datetime.now(dt.timezone.utc).isoformat())
    at(0, force=True)
    at(1, force=True)
    assert calls == [(0.01, 7), (0.1, 7), (1.0, 7), (0.01, 0), (0.01, 1)]  # the sweep once in the forced batch
    monkeypatch.setenv(runs.BATCH_STARTED_ENV, "2026-12-06T22:00:00")  # hand-set without a time zone: ignored
    assert not runs.made_this_batch(rec)


def test_a_shared_run_is_the_newest_donor_of_this_code_without_the_studys_own_markers(outputs, monkeypatch):
    def donor(study, started, version="v1", status="ok", artifacts=None):
        r = runs.RunRecord(run_id=f"{study}--gqa--s--{started[-2:]}", study=study, technique="gqa", profile="tiny",
                           scale="s", params={"seed": 0}, quality={"ppl": float(started[-2:])}, status=status,
                           started_at=started, code_version=version,
                           environment={"device_name": "cpu A", "host_other_cpu_frac": 0.3},
                           artifacts={"computation": "c1", "loss_curve": [3.0, 2.0]} | (artifacts or {}))
        runs.write_record(r)
        return r

    old = donor("attention", "2026-12-07T01:00:00+00:10")
    new = donor("moe", "2026-12-07T02:00:00+00:20", artifacts={"lr_sweep": {"best": 0.003}, "lr_sweep_point": True})
    donor("depth_width", "2026-12-07T03:00:00+00:30", version="v0")  # other code
    donor("attention_free", "2026-12-07T03:00:00+00:40", status="failed")
    shared = runs.shared_runs("tiny", ["attention", "moe", "depth_width", "attention_free"], "v1")
    assert list(shared) == ["c1"] and shared["c1"].run_id == new.run_id  # the newest ok one of this code
    assert runs.shared_runs("tiny", ["attention"], "v1", force=True) == {}  # --force: only this batch's records
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert runs.shared_runs("tiny", ["attention", "moe"], "v1") == {}  # ranks would have to agree
    monkeypatch.delenv("WORLD_SIZE")
    result = runs.result_of(new)
    assert result["environment"] == new.environment and result["quality"] == new.quality
    assert "lr_sweep" not in result["artifacts"] and "lr_sweep_point" not in result["artifacts"]
    assert result["artifacts"]["loss_curve"] == [3.0, 2.0] and result["artifacts"]["same_run_as"] == new.run_id
    copy = runs.execute("positional_encoding", "rope", "tiny", {"seed": 0}, lambda: result, scale="s", verbose=False)
    assert copy.environment == new.environment and copy.quality == new.quality  # measured there, recorded here
    assert runs.shared_copies_changed([copy]) == []
    runs.write_record(runs.RunRecord(**{**new.__dict__, "started_at": "2026-12-07T04:00:00+00:00"}))
    assert [why for _, why in runs.shared_copies_changed([copy])] == ["its run was measured again"]
    from effllm_utils.report import webpage

    page = webpage._warnings("tiny", ["positional_encoding"])
    assert "Shared runs out of date" in page and f"{copy.run_id}: its run was measured again" in page
    assert "positional_encoding rope = moe" in page and '--only positional_encoding --force' in page
    (runs.runs_dir("tiny", "moe") / f"{new.run_id}.json").unlink()
    assert [why for _, why in runs.shared_copies_changed([copy])] == ["its run's record is gone"]
    assert old.run_id  # the older donor stays on disk, unused
