"""`make reproduce`: run every study notebook of a profile in batch with papermill.

    python -m effllm_utils.cli.reproduce --profile tiny [--only hardware,attention] [--dry-run] [--force]
    python -m effllm_utils.cli.reproduce --profile gpu --only attention --set steps=200 --set dataset=embedded

Each study's `params/<profile>/<study>.yaml` is validated against its notebook's parameters cell first; each
notebook runs in its own kernel with a per-cell timeout and is written, executed, to
outputs/<profile>/notebooks/<study>.ipynb. A failing notebook is reported (cell and error) and the batch goes on;
the summary table ends the run, and the exit status is 1 if any study failed. Records are written atomically by the
notebooks and existing ones are skipped, so an interrupted batch (Ctrl-C, kill) resumes where it stopped.
`--set KEY=VALUE` overrides one parameter of every selected study for this run (checked against each notebook's
declaration); the records keep the params they ran with, so an override is never mistaken for the file's run.
`--seeds 0,1,2` (the small profile's default, PROFILE_SEEDS) runs each study that has a `seed` parameter once per
seed (its executed notebooks `<study>.seed<S>.ipynb`): the repeats a study's tables average, with their standard
error, and the claims check weighs; hardware and paper_figures run once, paper_figures last.
`--submit slurm` runs each study as a Slurm job through submitit (`--slurm-partition`, `--slurm-gpus`, ...; job logs
under outputs/<profile>/jobs/), `--submit local` the same as local processes; paper_figures starts after the others.

    python -m effllm_utils.cli.reproduce --profile paper --submit slurm --slurm-partition gpu --slurm-gpus 8
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from effllm_utils import PROFILE_SEEDS, PROFILES, outputs_dir, repo_root
from effllm_utils.cli import slurm
from effllm_utils.core import progress
from effllm_utils.core.params import (
    ParamsError,
    effective,
    job_block,
    notebook_parameters,
    notebook_path,
    parse_overrides,
    study_params,
    with_overrides,
)
from effllm_utils.core.runs import BATCH_STARTED_ENV, atomic_write_text
from effllm_utils.engine.sweep import check_sweep_seed, sweep_settings
from effllm_utils.studies import registry


# A study's notebook does its work in one cell, so the per-cell timeout bounds one study (one seed) and must exceed
# its longest honest run: a hung kernel, not a long study, is what it catches. small's PEFT seed 0 with its LR sweep
# (28 runs on SmolLM2, ~2-4 min each on 2 cores) needs ~85-90 min (estimated: the 1-hour timeout stopped it after 16),
# attention_free's Mamba and RWKV ~80-160 min; a gpu study's seed 0 with its sweep ~17 h (estimated). paper: none (a
# Slurm job's time limit bounds it; a local run passes --timeout). None: no timeout.
CELL_TIMEOUT_S: dict[str, int | None] = {"tiny": 3600, "small": 8 * 3600, "gpu": 48 * 3600, "paper": None}


def _timeout_text(t: int | None) -> str:
    return "none" if not t else f"{t / 3600:g} h"


def cell_timeout(profile: str, timeout: int | None) -> int | None:
    """The per-cell timeout in seconds for `profile` (None: none): `timeout` if given (0: none), else the profile's."""
    if timeout is not None:
        if timeout < 0:
            raise ValueError(f"--timeout {timeout}: give seconds (> 0), or 0 for no timeout")
        return timeout or None
    return CELL_TIMEOUT_S[profile]


@dataclass
class Outcome:
    study: str
    status: str  # ok | failed | planned
    seconds: float = 0.0
    detail: str = ""
    notebook: str = ""


# how often the batch's bar takes the study's progress line when stderr is a log file, not a terminal (each update
# is a line there: a 6-hour batch at the terminal's once a second would write ~20k)
LOG_PROGRESS_EVERY_S = 15.0


def manifest(root: Path) -> list[str]:
    """Studies with a notebook, in the canonical order (hardware first: the others use its measured peak)."""
    return [s for s in registry.names() if notebook_path(s, root).is_file()]


def select(only: str | None, root: Path) -> list[str]:
    available = manifest(root)
    if not only:
        return available
    chosen = [s.strip() for s in only.split(",") if s.strip()]
    for s in chosen:
        if s not in registry.names():
            raise ValueError(f"unknown study {s!r} in --only; known studies: {', '.join(registry.names())}")
        if s not in available:
            raise ValueError(f"study {s!r} has no notebook yet ({notebook_path(s, root)})")
    return [s for s in available if s in chosen]


def _ipc_kernel_manager():
    """A kernel manager that talks to the kernel over Unix sockets (IPC) instead of loopback TCP: nothing listens on
    a port, and ipykernel no longer warns at every study that it "is running over TCP without encryption". Each
    kernel gets socket paths of its own (jupyter's default, ./kernel-ipc-N, collides between concurrent jobs)."""
    import tempfile
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self):
            return "ipc" if os.name == "posix" else "tcp"

        @default("ip")
        def _ip_default(self):
            if self.transport != "ipc":
                return "127.0.0.1"
            return os.path.join(tempfile.gettempdir(), f"effllm-kernel-{uuid.uuid4().hex[:16]}")

    return IPCKernelManager


def run_study(study: str, profile: str, root: Path, force: bool, timeout_s: int | None, kernel: str | None,
              overrides: dict | None = None, name: str | None = None) -> Outcome:
    """Execute one study's notebook with its params (and `overrides`) into outputs/<profile>/notebooks/<name>.ipynb
    (`name`: the study by default; a row of the summary table)."""
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    t0 = time.perf_counter()
    name = name or study
    try:
        values = with_overrides(study, study_params(study, profile, root), overrides or {}, root)
    except ParamsError as e:
        return Outcome(name, "failed", 0.0, f"params: {e}")
    out_dir = outputs_dir(profile) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{name}.ipynb"
    partial = out_dir / f".{name}.partial.ipynb"
    try:
        papermill.execute_notebook(
            str(notebook_path(study, root)), str(partial), parameters={**values, "profile": profile, "force": force},
            kernel_name=kernel, execution_timeout=timeout_s, progress_bar=False, log_output=False, cwd=str(root),
            kernel_manager_class=_ipc_kernel_manager())
        outcome = Outcome(name, "ok", time.perf_counter() - t0, "", str(final))
    except PapermillExecutionError as e:
        # exec_count is the In [n] label of the executed notebook (which includes papermill's injected cell)
        detail = f"cell [{e.exec_count}]: {e.ename}: {e.evalue}".strip()
        outcome = Outcome(name, "failed", time.perf_counter() - t0, detail, str(final))
    except Exception as e:  # noqa: BLE001 - kernel death, timeout, bad notebook: report and go on
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        detail = f"{type(e).__name__}: {first}"[:500]
        if isinstance(e, DeadKernelError):  # killed from outside: on Linux most often the OOM killer
            detail = (f"the notebook's kernel died ({detail}), most often the out-of-memory killer (see `dmesg | "
                      f"grep -i oom`): lower batch_size or seq_len in params/{profile}/{study}.yaml (or --set); "
                      f"the records written before it are kept and the same command resumes")
        outcome = Outcome(name, "failed", time.perf_counter() - t0, detail, str(final))
    if partial.exists():
        partial.replace(final)  # the executed notebook, failed cells included, for inspection
    return outcome


@dataclass
class Task:
    """One notebook execution of a batch: a study, its overrides (--set, and the seed under --seeds) and its name."""
    study: str
    overrides: dict
    name: str


def parse_seeds(text: str | None) -> list[int]:
    """--seeds "0,1,2" -> [0, 1, 2]; integers, no repeats."""
    if not text:
        return []
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, e.g. 0,1,2, not {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct integers, e.g. 0,1,2, not {text!r}")
    return seeds


def plan(studies: list[str], overrides: dict, seeds: list[int], root: Path) -> list[Task]:
    """The notebook executions in order: each study once, or once per seed where `seeds` are given and the study has
    a `seed` parameter (hardware and paper_figures have none)."""
    if seeds and "seed" in overrides:
        raise ValueError("give the seed either with --seeds or with --set seed=..., not both")
    tasks = []
    for s in studies:
        if seeds and "seed" in notebook_parameters(notebook_path(s, root)):
            tasks += [Task(s, overrides | {"seed": seed}, f"{s}.seed{seed}") for seed in seeds]
        else:
            tasks.append(Task(s, overrides, s))
    return tasks


def job_resources(study: str, args, root: Path) -> dict:
    """One study's job resources (cli/slurm.py): the profile's defaults, the `slurm:` block of its params file,
    the --slurm-* flags given."""
    block, where = job_block(study, args.profile, root)
    flags = {"cpus": args.slurm_cpus, "mem_gb": args.slurm_mem_gb, "gpus": args.slurm_gpus,
             "time_min": args.slurm_time, "partition": args.slurm_partition}
    return slurm.resources(args.profile, slurm.check_block(block, where), flags)


def task_params(t: Task, profile: str, root: Path) -> dict:
    """The parameters a task's notebook runs with: its params file, the batch's overrides, the notebook's defaults."""
    return effective(t.study, with_overrides(t.study, study_params(t.study, profile, root), t.overrides, root), root)


def waves(tasks: list[Task], profile: str, root: Path) -> list[list[Task]]:
    """The order jobs can run in: first every task but the seeds after the first of a study that sweeps its LR
    (`lr_sweep_points` > 1: those seeds reuse the sweep the first one runs, instead of each running it) and
    paper_figures (it draws from every record), then those seeds, then paper_figures; empty waves left out."""
    seen, first, later, last = set(), [], [], []
    for t in tasks:
        if registry.get(t.study).reads_all:
            last.append(t)
        elif t.study in seen and _sweeps(t, profile, root):
            later.append(t)
        else:
            first.append(t)
        seen.add(t.study)
    return [w for w in (first, later, last) if w]


def _sweeps(t: Task, profile: str, root: Path) -> bool:
    try:
        return sweep_settings(task_params(t, profile, root))[0] > 1
    except (ParamsError, ValueError):  # bad params: the job reports them
        return False


def submit(tasks: list[Task], args, root: Path, timeout: int | None) -> list[Outcome]:
    """Each task (a study, or a study and seed) as one job through submitit (`--submit slurm`: sbatch on a Slurm
    cluster; `local`: a process here), in `waves`: at once, except the later seeds of a study that sweeps its LR
    (in a second wave, after every study's first seed) and paper_figures, which draws from every record and so
    starts when the others ended. Returns their outcomes in task order, as the sequential runner does; job logs under
    outputs/<profile>/jobs/."""
    import submitit  # main() checked it imports before anything ran

    folder = outputs_dir(args.profile) / "jobs"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=args.submit)
    requests = {t.name: job_resources(t.study, args, root) for t in tasks}

    refused: dict[str, Outcome] = {}

    def launch(group: list[Task]) -> dict:
        jobs = {}
        for t in group:
            executor.update_parameters(**slurm.submitit_parameters(requests[t.name], f"effllm-{t.name}"))
            try:
                jobs[t.name] = executor.submit(run_study, t.study, args.profile, root, args.force, timeout,
                                               args.kernel, t.overrides, t.name)
            except Exception as e:  # noqa: BLE001 - sbatch refused the request outright: one line, the rest go on
                why = slurm.refused_message(t.name, requests[t.name], e, args.submit)
                print(why, file=sys.stderr, flush=True)
                refused[t.name] = Outcome(t.name, "failed", 0.0, why)
                continue
            r = requests[t.name]
            print(f"submitted {t.name}: job {jobs[t.name].job_id} ({args.submit}: {r['cpus']} CPUs, {r['mem_gb']} GB, "
                  f"{r['gpus']} GPUs, {r['time_min']} min; log {folder})", file=sys.stderr, flush=True)
        return jobs

    def wait(jobs: dict) -> dict[str, Outcome]:
        cancelled = slurm.watch(jobs, requests) if args.submit == "slurm" else {}
        done = {s: Outcome(s, "failed", 0.0, why) for s, why in cancelled.items()}
        for s, job in jobs.items():
            if s in done:
                continue
            try:
                done[s] = job.result()
            except Exception as e:  # noqa: BLE001 - the job itself died (Slurm timeout, node failure, ...)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                done[s] = Outcome(s, "failed", 0.0, f"job {job.job_id}: {first}"[:500])
                if args.submit == "slurm":
                    print(f"{s}: job {job.job_id} failed; the end of its log:\n{slurm.log_tail(job)}", file=sys.stderr)
        return done

    outcomes: dict[str, Outcome] = {}
    for wave in waves(tasks, args.profile, root):
        outcomes |= wait(launch(wave))
    return [(outcomes | refused)[t.name] for t in tasks]


def _table(outcomes: list[Outcome]) -> str:
    rows = [("study", "status", "time", "detail")] + [(o.study, o.status, f"{o.seconds:.1f}s", o.detail)
                                                      for o in outcomes]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}" for r in rows)


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def host_speed(profile: str) -> dict | None:
    """This host's speed as the hardware study measured it (its newest ok records on this device): the fp32 matmul
    peak and the reference training step of its telemetry-overhead check. A shared VM's speed can change by 1.8x
    between hours (2026-12-07: the same tiny runs at 5.5k against 9.9k tokens/s), so a batch's time means something
    only beside these; the summary keeps them. None where the hardware study has no record here."""
    from effllm_utils.core import runs
    from effllm_utils.core.provenance import device_name

    here = device_name()
    newest: dict[str, runs.RunRecord] = {}
    for r in sorted(runs.load_records(profile, "hardware"), key=lambda r: r.started_at):
        if r.status == "ok" and r.environment.get("device_name") == here:
            newest[r.technique] = r
    matmul, ref = newest.get("matmul_fp32"), newest.get("telemetry_overhead")
    if matmul is None and ref is None:
        return None
    out = {"device": here}
    if matmul is not None and matmul.metrics.get("matmul_tflops") is not None:
        out |= {"matmul_fp32_gflops": round(1e3 * float(matmul.metrics["matmul_tflops"]), 1),
                "matmul_measured_at": matmul.started_at}
    if ref is not None and ref.metrics.get("step_s_off") is not None:
        out |= {"reference_step_ms": round(1e3 * float(ref.metrics["step_s_off"]), 2),
                "reference_measured_at": ref.started_at}
    return out if len(out) > 1 else None  # records without either value: nothing measured to say


def speed_line(speed: dict, started: str) -> str:
    """The summary's host-speed line; a speed measured before the batch started (its hardware study skipped: the
    records existed) says when, and how to measure it now."""
    line = (f"host speed (hardware study): fp32 matmul peak {speed.get('matmul_fp32_gflops', '?')} GFLOP/s, "
            f"reference training step {speed.get('reference_step_ms', '?')} ms; compare batch times at like speeds")
    when = min(v for k, v in speed.items() if k.endswith("_measured_at"))
    if dt.datetime.fromisoformat(when) < dt.datetime.fromisoformat(started):
        line += f" (measured {when[:16]}, before this batch: `--only hardware --force` measures it now)"
    return line


def busy_host_warning(seconds: float = 0.5) -> float | None:
    """Before a local batch: the share of this host's CPUs other processes use, sampled for `seconds`; one warning
    line on stderr above `provenance.SHARED_CPU_WARN` (the batch goes on; each record says how much it shared)."""
    from effllm_utils.core.provenance import SHARED_CPU_WARN, HostLoad

    with HostLoad() as load:
        time.sleep(seconds)
    if (load.other_cpu_frac or 0.0) > SHARED_CPU_WARN:
        print(f"warning: other processes are using {load.other_cpu_frac:.0%} of this host's CPUs; the runs' times, "
              "throughput and energy will be suspect (each record says how much it shared): stop them or run later",
              file=sys.stderr)
    return load.other_cpu_frac


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effllm_utils.cli.reproduce", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "tiny"), help=f"one of {', '.join(PROFILES)}")
    ap.add_argument("--only", help="comma-separated studies to run (default: every study with a notebook)")
    ap.add_argument("--dry-run", action="store_true", help="validate params and print the plan; run nothing")
    ap.add_argument("--force", action="store_true", help="re-run techniques whose records exist")
    ap.add_argument("--timeout", type=int, default=None,
                    help="per-cell execution timeout in seconds, 0 for none (default: the profile's, "
                         + ", ".join(f"{p} {_timeout_text(t)}" for p, t in CELL_TIMEOUT_S.items()) + ")")
    ap.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's, python3)")
    ap.add_argument("--root", type=Path, default=None, help="effllm checkout holding notebooks/ and params/")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a parameter of the selected studies for this run (VALUE as YAML); repeatable")
    ap.add_argument("--seeds", default=None, metavar="S,S,...",
                    help="run each study that has a seed parameter once per seed (repeats: tables show their mean "
                         "and standard error)")
    ap.add_argument("--submit", choices=("slurm", "local"), default=None,
                    help="run each study as a job through submitit, on a Slurm cluster or as local processes "
                         "(paper_figures after the others); waits and prints the same table")
    ap.add_argument("--slurm-partition", default=None, help="Slurm partition of the jobs")
    ap.add_argument("--slurm-gpus", type=int, default=None, help="GPUs per job (default: the profile's, "
                    "cli/slurm.py PROFILE_RESOURCES, or the study's slurm: block)")
    ap.add_argument("--slurm-cpus", type=int, default=None, help="CPUs per job (default: as --slurm-gpus)")
    ap.add_argument("--slurm-mem-gb", type=int, default=None, help="memory per job in GB (default: as --slurm-gpus)")
    ap.add_argument("--slurm-time", type=int, default=None, help="time limit per job in minutes (default: as "
                    "--slurm-gpus)")
    args = ap.parse_args(argv)
    if args.root:
        os.environ["EFFLLM_ROOT"] = str(args.root.resolve())  # kernels inherit it
    root = repo_root()
    try:
        if args.profile not in PROFILES:
            raise ValueError(f"unknown profile {args.profile!r}; choose one of {', '.join(PROFILES)}")
        timeout = cell_timeout(args.profile, args.timeout)
        studies = select(args.only, root)
        overrides = parse_overrides(args.overrides)
        for st in studies:  # every override must be a parameter of every selected study, before anything runs
            with_overrides(st, {}, overrides, root)
        seeds = parse_seeds(args.seeds) if args.seeds else (  # the profile's default seeds, unless --set seed=
            [] if "seed" in overrides else list(PROFILE_SEEDS.get(args.profile, ())))
        tasks = plan(studies, overrides, seeds, root)
        for t in tasks:  # an LR sweep at a reported seed: refused before anything trains, not at that seed's turn
            try:
                P = task_params(t, args.profile, root)
            except (ParamsError, ValueError):
                continue  # a bad params file: reported when its study runs, and the batch goes on
            check_sweep_seed(P, t.name)
        if args.submit and importlib.util.find_spec("submitit") is None:
            raise ValueError("--submit needs submitit (pip install submitit); or run without --submit")
    except (ValueError, ParamsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not studies:
        print(f"error: no study notebooks under {root / 'notebooks'}", file=sys.stderr)
        return 2

    if args.dry_run:
        bad = 0
        print(f"per-cell timeout: {_timeout_text(timeout)} ("
              + ("--timeout" if args.timeout is not None else f"the {args.profile} profile's; --timeout to change") + ")")
        for t in tasks:
            s = t.study
            try:
                values = with_overrides(s, study_params(s, args.profile, root), t.overrides, root)
                # technique and model specs: config fields, checked, not just typed
                registry.check(s, task_params(t, args.profile, root))
                print(f"{t.name}: notebooks/{s}.ipynb with params/{args.profile}/{s}.yaml {json.dumps(values)}")
                if args.submit == "slurm":  # the job script each study is submitted with
                    print(slurm.sbatch_script(job_resources(s, args, root), f"effllm-{t.name}",
                                              outputs_dir(args.profile) / "jobs"))
            except (ParamsError, ValueError) as e:
                bad += 1
                print(f"{t.name}: error: {e}")
        return 1 if bad else 0

    from tqdm.auto import tqdm

    if args.submit != "slurm":  # a local batch, or local jobs: they run on this host
        busy_host_warning()
    signal.signal(signal.SIGTERM, _sigterm)
    outcomes: list[Outcome] = []
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    before = os.environ.get(BATCH_STARTED_ENV)
    os.environ[BATCH_STARTED_ENV] = dt.datetime.now(dt.timezone.utc).isoformat()  # notebooks and jobs inherit it
    where = "while waiting for the jobs (submitted jobs go on)"
    try:
        if args.submit:
            outcomes = submit(tasks, args, root, timeout)
        else:
            bar = tqdm(tasks, desc=f"reproduce[{args.profile}]", unit="run", file=sys.stderr)
            for t in bar:
                where = f"during {t.name!r}"
                bar.set_postfix_str(t.name)
                # the study's stage (technique n of N) and its innermost bar, beside its name (core.progress)
                with progress.relay(lambda line, name=t.name: bar.set_postfix_str(f"{name}: {line}"),
                                    progress.PUBLISH_EVERY_S if sys.stderr.isatty() else LOG_PROGRESS_EVERY_S):
                    o = run_study(t.study, args.profile, root, args.force, timeout, args.kernel, t.overrides,
                                  t.name)
                outcomes.append(o)
                if o.status != "ok":
                    tqdm.write(f"FAILED {t.name}: {o.detail}", file=sys.stderr)
    except slurm.SlurmUnavailable as e:
        print(f"\nslurm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted {where}: finished records are kept and nothing half-written remains; "
              f"run the same command again to resume", file=sys.stderr)
        return 130
    finally:  # this batch's mark is not the caller's (main() called again in one process is another batch)
        if before is None:
            os.environ.pop(BATCH_STARTED_ENV, None)
        else:
            os.environ[BATCH_STARTED_ENV] = before
    speed = host_speed(args.profile) if args.submit != "slurm" else None  # jobs run on other nodes
    summary = {"profile": args.profile, "started_at": started, "force": args.force,
               "seconds": round(sum(o.seconds for o in outcomes), 1), "host_speed": speed,
               "studies": [asdict(o) for o in outcomes]}
    atomic_write_text(outputs_dir(args.profile) / "reproduce_summary.json", json.dumps(summary, indent=1) + "\n")
    print("\n" + _table(outcomes))
    if speed:  # a batch's time is comparable only at a like host speed (a shared VM's changes by hours)
        print(speed_line(speed, started))
    failed = [o.study for o in outcomes if o.status != "ok"]
    print(f"\n{len(outcomes) - len(failed)} ok, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else "")
          + f"; executed notebooks in {outputs_dir(args.profile) / 'notebooks'}")
    report = outputs_dir(args.profile) / "report" / "index.html"
    if any(o.study == "paper_figures" and o.status == "ok" for o in outcomes) and report.is_file():
        print(f"report (built by paper_figures): {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
