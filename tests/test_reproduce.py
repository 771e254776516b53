"""The batch runner end to end on small fixture notebooks, each executed by papermill in its own kernel."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from effllm_utils import repo_root
from effllm_utils.cli import reproduce
from effllm_utils.core import aggregate, runs

PARAMS = 'profile: str = "tiny"  # profile\nforce: bool = False  # force\nfail: bool = False  # raise in the body\n' \
         'sleep_s: float = 0.0  # pause between the two records\n'
BODY = '''import os, time
from effllm_utils.core import params, runs
P = params.from_namespace(STUDY, globals())
def measure(name):
    with open(os.environ["EFFLLM_TEST_COUNTER"], "a") as f:
        f.write(name + "\\n")
    return {"metrics": {"al_s": 1.0}}
runs.execute(STUDY, "first", profile, P, lambda: measure("first"), force=force)
if fail or os.environ.get("EFFLLM_TEST_FAIL") == STUDY:
    raise ValueError("boom in the study")
if os.environ.get("EFFLLM_TEST_DIE") == STUDY:  # as the out-of-memory killer would
    import signal
    os.kill(os.getpid(), signal.SIGKILL)
from effllm_utils.core import progress
progress.stage("second", 2, 2)
time.sleep(0.0 if os.environ.get("EFFLLM_TEST_NO_SLEEP") else sleep_s)
runs.execute(STUDY, "second", profile, P, lambda: measure("second"), force=force)'''


def make_study(root: Path, study: str, yaml_text: str = "", extra_params: str = "") -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(PARAMS + extra_params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(BODY.replace("STUDY", repr(study)))]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    (root / "notebooks").mkdir(exist_ok=True)
    nbformat.write(nb, root / "notebooks" / f"{study}.ipynb")
    (root / "params" / "tiny").mkdir(parents=True, exist_ok=True)
    (root / "params" / "tiny" / f"{study}.yaml").write_text(yaml_text)


@pytest.fixture
def root(tmp_path, outputs, monkeypatch):
    monkeypatch.setenv("EFFLLM_TEST_COUNTER", str(tmp_path / "counter.txt"))
    # main(["--root", ...]) exports EFFLLM_ROOT for the kernels: setting it here first makes monkeypatch restore the
    # variable's original state afterwards, so later tests (in any order) see the real checkout
    monkeypatch.setenv("EFFLLM_ROOT", "")
    monkeypatch.delenv("EFFLLM_ROOT")
    r = tmp_path / "checkout"
    r.mkdir()
    return r


def counter(root: Path) -> list[str]:
    p = root.parent / "counter.txt"
    return p.read_text().split() if p.exists() else []


def test_batch_goes_on_after_a_failure_and_resumes(root, outputs, capsys, monkeypatch):
    make_study(root, "hardware")
    make_study(root, "attention")
    monkeypatch.setenv("EFFLLM_TEST_FAIL", "attention")  # fails after its first record, same params next time
    make_study(root, "moe", "sleep_s: fast\n")  # bad params: reported, batch goes on
    code = reproduce.main(["--profile", "tiny", "--root", str(root)])
    out = capsys.readouterr()
    assert code == 1 and "EFFLLM_BATCH_STARTED" not in os.environ  # the batch's mark does not outlive it
    lines = {line.split()[0]: line for line in out.out.splitlines() if line.strip()}
    assert "failed" in lines["attention"] and "cell [3]: ValueError: boom in the study" in lines["attention"]
    assert "failed" in lines["moe"] and "moe.yaml: key 'sleep_s' must be float, got str 'fast'" in lines["moe"]
    assert "1 ok, 2 failed: attention, moe" in out.out
    assert counter(root) == ["first", "second", "first"]
    nb_dir = outputs / "tiny" / "notebooks"
    assert sorted(p.name for p in nb_dir.iterdir()) == ["attention.ipynb", "hardware.ipynb"]  # no partials left
    executed = nbformat.read(nb_dir / "hardware.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    summary = json.loads((outputs / "tiny" / "reproduce_summary.json").read_text())
    assert [s["status"] for s in summary["studies"]] == ["ok", "failed", "failed"]
    assert summary["seconds"] == pytest.approx(sum(s["seconds"] for s in summary["studies"]), abs=0.2)
    assert summary["host_speed"] is None and "host speed" not in out.out  # no matmul record: nothing to say

    # second run: records that exist are skipped; only the failed study's missing record is retried
    monkeypatch.delenv("EFFLLM_TEST_FAIL")
    (root / "params" / "tiny" / "moe.yaml").write_text("")
    assert reproduce.main(["--profile", "tiny", "--root", str(root)]) == 0
    assert counter(root) == ["first", "second", "first", "second", "first", "second"]
    assert len(aggregate.load_runs("tiny")) == 6
    # --force re-runs everything of the selected study
    assert reproduce.main(["--profile", "tiny", "--root", str(root), "--only", "hardware", "--force"]) == 0
    assert counter(root)[-2:] == ["first", "second"] and len(counter(root)) == 8


def test_a_killed_kernel_is_one_line_pointing_at_memory(root, outputs, capsys, monkeypatch):
    make_study(root, "attention")
    make_study(root, "moe")
    monkeypatch.setenv("EFFLLM_TEST_DIE", "attention")
    assert reproduce.main(["--profile", "tiny", "--root", str(root)]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("attention"))
    assert "failed" in line and "the notebook's kernel died (DeadKernelError" in line
    assert "out-of-memory killer" in line and "params/tiny/attention.yaml" in line
    assert counter(root) == ["first", "first", "second"]  # attention's first record kept; moe ran after it


def test_the_cell_timeout_is_the_profiles_unless_given_and_a_timed_out_study_keeps_its_records(root, outputs, capsys):
    from effllm_utils import PROFILES

    assert set(reproduce.CELL_TIMEOUT_S) == set(PROFILES)  # a new profile must state its own
    assert reproduce.cell_timeout("tiny", None) == 3600 and reproduce.cell_timeout("paper", None) is None
    assert reproduce.cell_timeout("small", None) > 2 * 3600  # small's PEFT seed 0 with its sweep needs ~85-90 min
    assert reproduce.cell_timeout("small", 0) is None and reproduce.cell_timeout("tiny", 5) == 5
    assert reproduce.main(["--root", str(root), "--timeout", "-1"]) == 2
    assert "--timeout -1: give seconds (> 0), or 0 for no timeout" in capsys.readouterr().err
    make_study(root, "hardware", "sleep_s: 30\n")
    assert reproduce.main(["--profile", "tiny", "--root", str(root), "--timeout", "3"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("hardware"))
    assert "failed" in line and "CellTimeoutError" in line
    assert counter(root) == ["first"]  # the record written before the timeout is kept: a rerun resumes after it


def test_each_study_runs_under_its_profiles_cell_timeout_unless_given(root, outputs, monkeypatch):
    make_study(root, "hardware")
    for profile in ("small", "gpu"):
        (root / "params" / profile).mkdir(parents=True, exist_ok=True)
        (root / "params" / profile / "hardware.yaml").write_text("")
    seen = []
    monkeypatch.setattr(reproduce, "run_study", lambda study, profile, root, force, timeout_s, *a, **k:
                        seen.append((profile, timeout_s)) or reproduce.Outcome(study, "ok"))
    for argv in (["--profile", "tiny"], ["--profile", "small"], ["--profile", "small", "--timeout", "0"],
                 ["--profile", "gpu", "--timeout", "60"]):
        assert reproduce.main(["--root", str(root), "--only", "hardware", *argv]) == 0
    assert seen == [("tiny", 3600), ("small", 8 * 3600), ("small", None), ("gpu", 60)]


def test_cli_errors_and_dry_run(root, capsys):
    make_study(root, "hardware", "sleep_s: 0.5\n")
    assert reproduce.main(["--root", str(root), "--only", "atention"]) == 2
    assert "unknown study 'atention' in --only" in capsys.readouterr().err
    assert reproduce.main(["--root", str(root), "--only", "peft"]) == 2
    assert "study 'peft' has no notebook yet" in capsys.readouterr().err
    assert reproduce.main(["--root", str(root), "--profile", "huge"]) == 2
    assert "unknown profile 'huge'" in capsys.readouterr().err
    assert reproduce.main(["--root", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert 'hardware: notebooks/hardware.ipynb with params/tiny/hardware.yaml {"sleep_s": 0.5}' in out
    assert out.startswith("per-cell timeout: 1 h (the tiny profile's; --timeout to change)\n")
    assert reproduce.main(["--root", str(root), "--dry-run", "--timeout", "0"]) == 0
    assert capsys.readouterr().out.startswith("per-cell timeout: none (--timeout)\n")
    (root / "params" / "tiny" / "hardware.yaml").write_text("slep_s: 1\n")
    assert reproduce.main(["--root", str(root), "--dry-run"]) == 1
    assert "unknown key 'slep_s'" in capsys.readouterr().out
    assert counter(root) == []  # a dry run runs nothing


def test_set_overrides_a_parameter_for_one_run(root, outputs, capsys):
    make_study(root, "hardware", "sleep_s: 0.5\n")
    assert reproduce.main(["--root", str(root), "--dry-run", "--set", "sleep_s=0", "--set", "fail=false"]) == 0
    assert '{"sleep_s": 0.0, "fail": false}' in capsys.readouterr().out  # int widened to the declared float
    for bad, msg in ((["--set", "sleep_s"], "--set 'sleep_s': write KEY=VALUE"),
                     (["--set", "slep_s=1"], "--set for hardware: unknown key 'slep_s'"),
                     (["--set", "sleep_s=fast"], "key 'sleep_s' must be float, got str 'fast'"),
                     (["--set", "force=true"], "--set force: set by the runner"),
                     (["--set", "sleep_s=[1,"], "--set 'sleep_s=[1,': VALUE is not a YAML value")):
        assert reproduce.main(["--root", str(root), *bad]) == 2, bad
        assert msg in capsys.readouterr().err
    assert counter(root) == []  # a bad override runs nothing
    assert reproduce.main(["--root", str(root), "--set", "sleep_s=0"]) == 0
    df = aggregate.load_runs("tiny")
    assert len(df) == 2 and (df["param.sleep_s"] == 0.0).all()  # the records keep the params they ran with


def test_the_batch_bar_names_what_the_study_is_on(root, outputs, capsys, monkeypatch):
    monkeypatch.setattr(reproduce, "LOG_PROGRESS_EVERY_S", 0.5)  # captured stderr is a log, not a terminal
    make_study(root, "hardware", "sleep_s: 2.5\n")
    assert reproduce.main(["--root", str(root)]) == 0
    assert "hardware: second (2 of 2)" in capsys.readouterr().err  # published by the kernel, shown by the batch


def test_kill_leaves_no_half_written_record_and_the_next_run_resumes(root, outputs):
    make_study(root, "hardware", "sleep_s: 60.0\n")
    env = dict(os.environ, EFFLLM_OUTPUTS=str(outputs))
    cmd = [sys.executable, "-m", "effllm_utils.cli.reproduce", "--profile", "tiny", "--root", str(root)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = outputs / "tiny" / "runs" / "hardware"
    deadline = time.time() + 120
    while not (folder.is_dir() and any(folder.glob("*.json"))) and time.time() < deadline:
        time.sleep(0.2)
    assert counter(root) == ["first"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command again to resume" in err
    assert "without encryption" not in err  # the kernel talks over IPC, not TCP (no warning per study)
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 1 and files[0].startswith("hardware--first--") and files[0].endswith(".json")
    assert runs.read_record(folder / files[0]).status == "ok"

    (root / "params" / "tiny" / "hardware.yaml").write_text("")
    # a changed params file is a new run identity; resume with the same params instead:
    (root / "params" / "tiny" / "hardware.yaml").write_text("sleep_s: 60.0\n")
    # (editing the notebook's code would make another code version: hardware hashes its notebook)
    assert subprocess.run(cmd, env=env | {"EFFLLM_TEST_NO_SLEEP": "1"}, capture_output=True).returncode == 0
    assert counter(root) == ["first", "second"]  # the first record was not measured again


def test_dry_run_checks_technique_keys_against_the_model_config(capsys, monkeypatch):
    """The real attention study's params with a misspelt technique key: the dry run names it, nothing runs."""
    repo = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("EFFLLM_ROOT", repo)  # main() sets it from --root; restored after the test
    args = ["--root", repo, "--only", "attention,attention_free", "--dry-run"]
    assert reproduce.main(args) == 0
    capsys.readouterr()
    bad = '{"mla": {"atention": "mla"}, "pythia": {"baseline": "pythia", "parallel_residual": false}}'
    assert reproduce.main([*args, "--set", f"techniques={bad}"]) == 1
    out = capsys.readouterr().out
    assert "attention: error: techniques['mla']: unknown config key 'atention' (did you mean 'attention'?)" in out
    assert "attention_free: error: techniques['mla']: unknown config key 'atention'" in out


def test_seeds_run_each_seeded_study_once_per_seed(root, outputs, capsys):
    """--seeds: a study with a `seed` parameter runs once per seed (its notebooks named by seed), one without (the
    hardware study) once; bad lists and a seed given twice are one-line errors that run nothing."""
    make_study(root, "hardware")
    make_study(root, "attention", "seed: 3\n", extra_params="seed: int = 0  # random seed\n")
    for bad, msg in ((["--seeds", "0,x"], "--seeds takes comma-separated integers"),
                     (["--seeds", "1,1"], "--seeds needs distinct integers"),
                     (["--seeds", "0,1", "--only", "attention", "--set", "seed=2"],
                      "either with --seeds or with --set")):
        assert reproduce.main(["--root", str(root), *bad]) == 2, bad
        assert msg in capsys.readouterr().err
    tasks = reproduce.plan(["hardware", "attention"], {"sleep_s": 0.0}, [0, 1], root)
    assert [(t.name, t.study, t.overrides) for t in tasks] == [
        ("hardware", "hardware", {"sleep_s": 0.0}), ("attention.seed0", "attention", {"sleep_s": 0.0, "seed": 0}),
        ("attention.seed1", "attention", {"sleep_s": 0.0, "seed": 1})]
    assert counter(root) == []
    assert reproduce.main(["--root", str(root), "--seeds", "0,1"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if ".seed" in line.split(" ")[0]]
    assert names == ["attention.seed0", "attention.seed1"]
    assert sorted(p.name for p in (outputs / "tiny" / "notebooks").iterdir()) == [
        "attention.seed0.ipynb", "attention.seed1.ipynb", "hardware.ipynb"]
    assert sorted(aggregate.load_runs("tiny", "attention")["param.seed"]) == [0, 0, 1, 1]
    assert len(aggregate.load_runs("tiny", "hardware")) == 2


def test_submit_local_runs_each_study_as_a_job_and_prints_the_table(root, outputs, capsys):
    """--submit local: submitit's local executor, the same path as --submit slurm without a cluster; paper_figures
    (here a fixture study of that name) starts after the others."""
    make_study(root, "hardware")
    make_study(root, "attention", "fail: true\n")
    make_study(root, "paper_figures")
    assert reproduce.main(["--root", str(root), "--submit", "local", "--slurm-time", "10"]) == 1
    out, err = capsys.readouterr()
    assert [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["hardware"], ["attention"],
                                                                                   ["paper_figures"])] == \
        [["hardware", "ok"], ["attention", "failed"], ["paper_figures", "ok"]]
    assert "cell [" in out and "ValueError: boom in the study" in out
    assert err.count("submitted ") == 3 and (outputs / "tiny" / "jobs").is_dir()
    assert sorted(counter(root)) == ["first", "first", "first", "second", "second"]
    summary = json.loads((outputs / "tiny" / "reproduce_summary.json").read_text())
    assert [s["status"] for s in summary["studies"]] == ["ok", "failed", "ok"]


def test_job_resources_profile_defaults_then_the_params_block_then_flags(tmp_path, capsys, monkeypatch):
    """A job asks for what its profile needs (tiny: a laptop-sized node; gpu: one GPU), a study's `slurm:` block
    in its params file changes that, and the --slurm-* flags given change it again; --dry-run prints the script."""
    import argparse
    import shutil

    from effllm_utils import repo_root
    from effllm_utils.cli import slurm

    monkeypatch.setenv("EFFLLM_ROOT", "")  # main(["--root", ...]) exports it: restored after this test
    monkeypatch.delenv("EFFLLM_ROOT")
    root = tmp_path / "repo"
    shutil.copytree(repo_root() / "notebooks", root / "notebooks")
    shutil.copytree(repo_root() / "params", root / "params")
    hw = root / "params" / "gpu" / "hardware.yaml"
    hw.write_text(hw.read_text() + "slurm: {gpus: 2, time_min: 30}\n")
    flags = dict(slurm_gpus=None, slurm_time=None, slurm_cpus=None, slurm_mem_gb=None, slurm_partition=None)
    tiny = reproduce.job_resources("hardware", argparse.Namespace(profile="tiny", **flags), root)
    assert tiny == slurm.PROFILE_RESOURCES["tiny"] | {"partition": None} and tiny["cpus"] == 2 and tiny["gpus"] == 0
    gpu = reproduce.job_resources("hardware", argparse.Namespace(profile="gpu", **flags), root)
    assert gpu["gpus"] == 2 and gpu["time_min"] == 30 and gpu["cpus"] == 16  # the block, over the defaults
    given = reproduce.job_resources("hardware", argparse.Namespace(profile="gpu", **flags | {
        "slurm_gpus": 1, "slurm_partition": "h100"}), root)
    assert given["gpus"] == 1 and given["partition"] == "h100" and given["time_min"] == 30
    assert slurm.submitit_parameters(given, "effllm-hardware") == {
        "timeout_min": 30, "cpus_per_task": 16, "mem_gb": 96, "name": "effllm-hardware", "gpus_per_node": 1,
        "slurm_partition": "h100"}
    assert "gpus_per_node" not in slurm.submitit_parameters(tiny, "x")
    for block, msg in (({"cpu": 2}, "unknown slurm key 'cpu'"), ({"gpus": -1}, "slurm gpus must be a whole number"),
                       ([2], "slurm must be a mapping")):
        with pytest.raises(ValueError, match=msg):
            slurm.check_block(block, "params/gpu/hardware.yaml")
    assert reproduce.main(["--profile", "gpu", "--only", "hardware", "--dry-run", "--submit", "slurm",
                           "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=2" in out and "#SBATCH --cpus-per-task=16" in out and "#SBATCH --time=30" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("hardware: notebooks/hardware.ipynb"))
    assert '"slurm"' not in line  # the block is the job's, not a notebook parameter


def test_cuda_only_torchao_kernels_are_not_reported_on_a_cpu_host(caplog):
    import logging

    import torch

    import effllm_utils  # noqa: F401 - installs the filter

    log = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING, logger="torchao"):
        log.warning("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
        log.warning("something else torchao says")
    messages = [r.getMessage() for r in caplog.records]
    assert "something else torchao says" in messages
    assert any("_C_mxfp8" in m for m in messages) == torch.cuda.is_available()


def test_one_study_in_process_for_torchrun_and_only_rank_0_records(outputs, capsys, monkeypatch):
    """`python -m effllm_utils.cli.study`: the study's runs without its notebook (what torchrun / accelerate launch
    start on every rank); params checked as the batch checks them; records written by rank 0 only."""
    from effllm_utils.cli import study

    one = ["--set", 'techniques={"gqa": {"attention": "gqa"}}', "--set", "steps=3", "--set", "eval_batches=1"]
    monkeypatch.setenv("RANK", "1")
    assert study.main(["--profile", "tiny", "--study", "attention", *one]) == 0
    assert not list((outputs / "tiny").rglob("runs/attention/*.json"))  # rank 1 trained, wrote nothing
    monkeypatch.setenv("RANK", "0")
    assert study.main(["--profile", "tiny", "--study", "attention", *one]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith(": ok") and len(list((outputs / "tiny" / "runs" / "attention").glob("*.json"))) == 1
    assert study.main(["--profile", "tiny", "--study", "atention"]) == 2
    assert "unknown study 'atention'" in capsys.readouterr().err
    assert study.main(["--profile", "tiny", "--study", "attention", "--set", "stepz=3"]) == 2


def test_a_failed_jobs_report_ends_with_the_tail_of_its_log():
    from effllm_utils.cli import slurm

    class Job:  # what slurm.log_tail reads of a submitit job: its two log files' text
        def __init__(self, err, out):
            self.err, self.out = err, out

        def stderr(self):
            return self.err

        def stdout(self):
            return self.out

    long = "\n".join(f"line {i}" for i in range(40)) + "\nRuntimeError: CUDA out of memory\n"
    assert slurm.log_tail(Job(long, "")).splitlines() == [f"line {i}" for i in range(21, 40)] + [
        "RuntimeError: CUDA out of memory"]
    assert slurm.log_tail(Job("", "only stdout")) == "only stdout"
    assert slurm.log_tail(Job(None, "  ")) == "(no log written)"


def test_which_pending_jobs_can_never_start():
    from effllm_utils.cli import slurm

    node = {"cpus": 2, "mem_gb": 22, "gpus": 0, "partitions": {"debug"}}
    ask = slurm.resources("tiny", {}, {})
    assert slurm.impossible(ask, "PENDING", "PartitionConfig", node)
    assert slurm.impossible(ask, "PENDING", "ReqNodeNotAvail, UnavailableNodes:n1", node)
    assert not slurm.impossible(ask, "PENDING", "Resources", node)  # fits a node: it waits its turn
    assert slurm.impossible(ask | {"gpus": 1}, "PENDING", "Resources", node)  # no node has a GPU
    assert not slurm.impossible(ask | {"cpus": 64}, "RUNNING", "None", node)
    line = slurm.unsatisfiable_message("hardware", "12", ask | {"cpus": 16}, "PartitionConfig", node)
    assert line.startswith("hardware: Slurm cannot start job 12 (PartitionConfig): asked 16 CPUs, 8 GB, 0 GPUs")
    assert "the largest node offers 2 CPUs, 22 GB, 0 GPUs (partitions: debug)" in line


def test_a_sweeping_studys_later_seeds_wait_for_its_first_and_a_clashing_sweep_seed_stops_the_batch(outputs, capsys):
    """--submit runs jobs in waves: the later seeds of a study that sweeps its LR after the first seed (which runs the
    sweep they reuse), paper_figures last; a sweep seed that is also one of --seeds stops the batch before any run."""
    T = reproduce.Task
    tasks = [T("hardware", {}, "hardware"),
             *(T("attention", {"seed": s, "lr_sweep_points": 3}, f"attention.seed{s}") for s in (0, 1, 2)),
             *(T("moe", {"seed": s}, f"moe.seed{s}") for s in (0, 1)), T("paper_figures", {}, "paper_figures")]
    assert [[t.name for t in w] for w in reproduce.waves(tasks, "tiny", repo_root())] == [
        ["hardware", "attention.seed0", "moe.seed0", "moe.seed1"], ["attention.seed1", "attention.seed2"],
        ["paper_figures"]]
    code = reproduce.main(["--profile", "tiny", "--only", "attention", "--seeds", "0,1", "--set", "lr_sweep_points=3",
                           "--set", "lr_sweep_seed=1"])
    assert code == 2 and not (outputs / "tiny" / "runs").exists()
    assert "error: attention.seed1: lr_sweep_seed 1 is also a reported seed" in capsys.readouterr().err


def test_host_speed_is_the_newest_ok_hardware_measure_of_this_device(outputs):
    """A batch's time means something only beside the host's speed then: the summary keeps the hardware study's
    newest fp32 matmul peak and reference step measured on this device (not another's, not a failed record's)."""
    from effllm_utils.core.provenance import device_name

    here = device_name()

    def rec(technique, when, metrics, device=here, status="ok"):
        runs.write_record(runs.RunRecord(
            run_id=f"hardware--{technique}--{when[11:13]}{device[:3]}{status}", study="hardware", technique=technique,
            profile="tiny", metrics=metrics, status=status, environment={"device_name": device}, started_at=when))

    assert reproduce.host_speed("tiny") is None
    rec("matmul_fp32", "2026-12-06T20:15:00+00:00", {"matmul_tflops": 0.1724})
    rec("matmul_fp32", "2026-12-07T07:03:00+00:00", {"matmul_tflops": 0.1174})
    rec("matmul_fp32", "2026-12-07T08:00:00+00:00", {"matmul_tflops": 9.9}, device="NVIDIA H100")
    rec("matmul_fp32", "2026-12-07T09:00:00+00:00", {"matmul_tflops": 0.5}, status="failed")
    rec("telemetry_overhead", "2026-12-07T07:03:08+00:00", {"step_s_off": 0.03495})
    speed = reproduce.host_speed("tiny")
    assert speed == {"device": here, "matmul_fp32_gflops": 117.4, "matmul_measured_at": "2026-12-07T07:03:00+00:00",
                     "reference_step_ms": 34.95, "reference_measured_at": "2026-12-07T07:03:08+00:00"}
    assert "before this batch" not in reproduce.speed_line(speed, "2026-12-07T07:00:00+00:00")
    assert reproduce.speed_line(speed, "2026-12-07T08:30:57+00:00").endswith(
        "(measured 2026-12-07T07:03, before this batch: `--only hardware --force` measures it now)")
