"""Slurm for `reproduce --submit slurm`: the resources each study's job asks for, the sbatch script it is submitted
with, and a watcher that never waits silently.

Resources: a per-profile default (`PROFILE_RESOURCES`: tiny and small fit a laptop-sized node, gpu one GPU, paper a
node of eight), then a study's `slurm:` block in `params/<profile>/<study>.yaml` (keys `RESOURCE_KEYS`), then the
`--slurm-*` flags. `--dry-run --submit slurm` prints the sbatch script of every job.

While waiting, the watcher reads each job's state and reason from `squeue`: a job Slurm cannot start as asked
(`UNSATISFIABLE` reasons, or `Resources` beyond the largest node `sinfo` reports) is cancelled with one line naming
the request and what the cluster offers; pending and running jobs show in a progress bar; a job that failed shows the
tail of its log.
"""
from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

PROFILE_RESOURCES: dict[str, dict[str, Any]] = {
    "tiny": {"cpus": 2, "mem_gb": 8, "gpus": 0, "time_min": 60},
    "small": {"cpus": 2, "mem_gb": 16, "gpus": 0, "time_min": 8 * 60},  # a study's seed: up to ~3 h measured
    "gpu": {"cpus": 16, "mem_gb": 96, "gpus": 1, "time_min": 24 * 60},
    "paper": {"cpus": 64, "mem_gb": 960, "gpus": 8, "time_min": 72 * 60},
}
RESOURCE_KEYS = ("cpus", "mem_gb", "gpus", "time_min", "partition")
# squeue reasons that mean the job as asked can never start here
UNSATISFIABLE = ("PartitionConfig", "ReqNodeNotAvail", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit",
                 "InvalidQOS", "InvalidAccount", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob", "QOSMaxMemoryPerJob")


def check_block(block: Any, where: str) -> dict[str, Any]:
    """A params file's `slurm:` block, checked: a mapping of RESOURCE_KEYS to positive numbers (partition: a name)."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ValueError(f"{where}: slurm must be a mapping of {', '.join(RESOURCE_KEYS)}, not {block!r}")
    for k, v in block.items():
        if k not in RESOURCE_KEYS:
            raise ValueError(f"{where}: unknown slurm key {k!r}; use {', '.join(RESOURCE_KEYS)}")
        if k == "partition" and not isinstance(v, str) or k != "partition" and (
                isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "gpus" else 1)):
            want = "a partition name" if k == "partition" else "a whole number"
            raise ValueError(f"{where}: slurm {k} must be {want}, not {v!r}")
    return dict(block)


def resources(profile: str, block: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The job's resources: the profile's defaults, the study's `slurm:` block, then the flags given (not None)."""
    return PROFILE_RESOURCES[profile] | {"partition": None} | block | {k: v for k, v in flags.items() if v is not None}


def submitit_parameters(r: dict[str, Any], name: str) -> dict[str, Any]:
    """submitit's AutoExecutor parameters for resources `r`."""
    p = {"timeout_min": r["time_min"], "cpus_per_task": r["cpus"], "mem_gb": r["mem_gb"], "name": name}
    if r["gpus"]:
        p["gpus_per_node"] = r["gpus"]
    if r["partition"]:
        p["slurm_partition"] = r["partition"]
    return p


def sbatch_script(r: dict[str, Any], name: str, folder) -> str:
    """The sbatch script submitit writes for such a job (its command: the pickled study run in `folder`)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=f"{sys.executable} -u -m submitit.core._submit {folder}", folder=folder,
                               job_name=name, partition=r["partition"], time=r["time_min"], cpus_per_task=r["cpus"],
                               gpus_per_node=r["gpus"] or None, mem=f"{r['mem_gb']}GB")


class SlurmUnavailable(RuntimeError):
    """squeue did not answer (a nonzero exit, a timeout, no binary) for longer than the watcher's grace period."""


def queue(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} of the jobs squeue still lists (finished ones drop out). Raises SlurmUnavailable when
    squeue fails: a failed query is not an empty queue (ids Slurm has already forgotten are: "Invalid job id")."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"], capture_output=True,
                             text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable("squeue did not answer in 30 s") from None
    except OSError as e:
        raise SlurmUnavailable(f"squeue could not run ({e})") from None
    if out.returncode != 0:
        err = " ".join(out.stderr.split())
        if "invalid job id" in err.lower():  # every id is past Slurm's MinJobAge: all ended
            return {}
        raise SlurmUnavailable(f"squeue exited {out.returncode}: {err[:200] or '(no message)'}")
    jobs = {}
    for line in out.stdout.splitlines():
        jid, state, reason = (line.split("|") + ["", ""])[:3]
        jobs[jid.strip()] = (state.strip(), reason.strip())
    return jobs


def largest_node() -> dict[str, Any]:
    """What the cluster's largest node offers: CPUs, memory (GB) and GPUs (from sinfo's gres)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c|%m|%G|%P"], capture_output=True, text=True, timeout=30)
    best = {"cpus": 0, "mem_gb": 0, "gpus": 0, "partitions": set()}
    for line in out.stdout.splitlines():
        c, m, g, part = (line.split("|") + ["", "", "", ""])[:4]
        gpus = sum(int(x.split(":")[-1].split("(")[0]) for x in g.split(",") if x.startswith("gpu") and
                   x.split(":")[-1].split("(")[0].isdigit())
        best["cpus"] = max(best["cpus"], int(c.rstrip("+") or 0))
        best["mem_gb"] = max(best["mem_gb"], int((m.rstrip("+") or "0")) // 1024)
        best["gpus"] = max(best["gpus"], gpus)
        best["partitions"].add(part.rstrip("*"))
    return best


def impossible(r: dict[str, Any], state: str, reason: str, node: dict[str, Any]) -> bool:
    """Whether a pending job can never start as asked: a reason Slurm gives for that, or more than any node has."""
    if state != "PENDING":
        return False
    if any(reason.startswith(u) for u in UNSATISFIABLE):
        return True
    return reason == "Resources" and (r["cpus"] > node["cpus"] or r["gpus"] > node["gpus"]
                                      or (node["mem_gb"] and r["mem_gb"] > node["mem_gb"]))


def unsatisfiable_message(name: str, job_id: str, r: dict[str, Any], reason: str, node: dict[str, Any]) -> str:
    parts = ", ".join(sorted(p for p in node["partitions"] if p))
    return (f"{name}: Slurm cannot start job {job_id} ({reason}): asked {r['cpus']} CPUs, {r['mem_gb']} GB, "
            f"{r['gpus']} GPUs, {r['time_min']} min on partition {r['partition'] or '(default)'}; the largest node "
            f"offers {node['cpus']} CPUs, {node['mem_gb']} GB, {node['gpus']} GPUs (partitions: {parts or '?'}). "
            f"Cancelled: lower the request with --slurm-cpus/--slurm-mem-gb/--slurm-gpus/--slurm-partition or a "
            f"slurm: block in the study's params file")


def refused_message(name: str, r: dict[str, Any], error: Exception, cluster: str = "slurm") -> str:
    """One line for a job the scheduler refused at submission, with what the cluster offers."""
    first = next((ln.strip() for ln in str(error).splitlines() if "error" in ln.lower()), "") or \
        (str(error).strip().splitlines() or [type(error).__name__])[0]
    offer = ""
    if cluster == "slurm":
        try:
            node = largest_node()
            offer = f"; the largest node offers {node['cpus']} CPUs, {node['mem_gb']} GB, {node['gpus']} GPUs"
        except (OSError, subprocess.SubprocessError):
            offer = ""
    return (f"{name}: {cluster} refused the job ({first[:200]}): asked {r['cpus']} CPUs, {r['mem_gb']} GB, "
            f"{r['gpus']} GPUs, {r['time_min']} min on partition {r['partition'] or '(default)'}{offer}; lower the "
            f"request (--slurm-cpus/--slurm-mem-gb/--slurm-gpus or a slurm: block in the study's params file)")


def log_tail(job, lines: int = 20) -> str:
    """The last lines of a job's stderr (then stdout) log, for a failure's report."""
    for read in (job.stderr, job.stdout):
        try:
            text = read() or ""
        except Exception:  # noqa: BLE001 - a log that was never written
            text = ""
        if text.strip():
            return "\n".join(text.strip().splitlines()[-lines:])
    return "(no log written)"


def watch(jobs: dict[str, Any], requests: dict[str, dict[str, Any]], poll_s: float = 3.0,
          squeue_grace_s: float = 600.0) -> dict[str, str]:
    """Wait for `jobs` ({name: submitit job}) with a progress bar of their states; cancel the ones Slurm cannot
    start. Returns {name: why} for the jobs cancelled so (the others are done: read their results). A failing squeue
    is retried for `squeue_grace_s`, then raises SlurmUnavailable (the jobs are left as they are)."""
    from tqdm.auto import tqdm

    cancelled: dict[str, str] = {}
    node = None
    bar = tqdm(total=len(jobs), desc="slurm jobs", unit="job", file=sys.stderr)
    left, gone = dict(jobs), {}
    failing_since = None
    while left:
        try:
            listed = queue([j.job_id for j in left.values()])
        except SlurmUnavailable as e:  # not "no jobs left": wait for Slurm to answer again
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > squeue_grace_s:
                bar.close()
                raise SlurmUnavailable(f"{e}, for {time.monotonic() - failing_since:.0f} s: the jobs "
                                       f"{', '.join(f'{n} ({j.job_id})' for n, j in left.items())} may still be "
                                       f"queued or running; look with squeue, and run the same command again when "
                                       f"Slurm answers (finished records are kept)") from None
            bar.set_postfix_str(f"{e}; retrying"[:120])
            time.sleep(poll_s)
            continue
        failing_since = None
        for name, job in list(left.items()):
            state, reason = listed.get(str(job.job_id), ("", ""))
            if str(job.job_id) not in listed:  # out of the queue: ended (its result file, or after a grace period
                gone.setdefault(name, time.monotonic())  # for a job killed before writing one)
            if str(job.job_id) not in listed and (job.paths.result_pickle.exists()
                                                  or time.monotonic() - gone[name] > 30):
                left.pop(name)
                bar.update(1)
                continue
            if state in ("PENDING",) and reason not in ("", "None", "Priority", "BeginTime", "Dependency"):
                try:
                    node = node or largest_node()
                except (OSError, subprocess.SubprocessError):  # sinfo did not answer: judge at the next poll
                    continue
                if impossible(requests[name], state, reason, node):
                    cancelled[name] = unsatisfiable_message(name, job.job_id, requests[name], reason, node)
                    job.cancel(check=False)
                    tqdm.write(cancelled[name], file=sys.stderr)
            if name in cancelled:
                left.pop(name)
                bar.update(1)
        bar.set_postfix_str(", ".join(f"{n}: {listed.get(str(j.job_id), ('ending', ''))[0].lower()}"
                                      for n, j in left.items())[:120])
        if left:
            time.sleep(poll_s)
    bar.close()
    return cancelled
