"""`reproduce --submit slurm` against a real one-node Slurm: munge, slurmctld and slurmd from Debian's `slurm-wlm` and
`munge` packages (`.ci/run` installs them), started here with a generated slurm.conf and stopped after the tests.
Skipped, with the reason, where the packages are missing or the daemons cannot be started (they need root)."""
import os
import shutil
import socket
import subprocess
import time

import pytest

from effllm_utils.cli import reproduce

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scancel", "scontrol")
SBIN = os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/sbin"))


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN)


def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, **kw)


def _conf(d, host: str, cpus: int, mem_mb: int, munge_socket) -> str:
    return f"""ClusterName=effllm-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Slurm on this machine for the module's tests: yields (node CPUs, slurm.conf path)."""
    missing = [b for b in DAEMONS + CLIENTS if _which(b) is None]
    if missing:
        pytest.skip(f"no Slurm here ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("starting munged, slurmctld and slurmd for the test needs root")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir()
    key, sock = d / "munge" / "munge.key", d / "munge" / "munge.sock"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (d / "munge").chmod(0o700)
    started = _run(_which("munged"), "--force", f"--key-file={key}", f"--socket={sock}",
                   f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'munge' / 'munged.log'}",
                   f"--seed-file={d / 'munge' / 'munged.seed'}")
    if started.returncode:
        pytest.skip(f"munged did not start: {started.stderr.strip()[:300]}")
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    conf = d / "slurm.conf"
    conf.write_text(_conf(d, host, cpus, mem_mb, sock))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)  # the clients (sbatch, squeue) and the jobs read it
    try:
        for daemon in ("slurmctld", "slurmd"):
            r = _run(_which(daemon), "-f", str(conf))
            if r.returncode:
                pytest.skip(f"{daemon} did not start: {(r.stderr or r.stdout).strip()[:300]}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = _run("sinfo", "-h", "-o", "%T").stdout.strip()
            if state.startswith(("idle", "mixed", "allocated")):
                break
            if state.startswith(("down", "drain")):
                _run("scontrol", "update", f"nodename={host}", "state=resume")
            time.sleep(1)
        else:
            logs = (d / "slurmctld.log").read_text()[-1500:] if (d / "slurmctld.log").exists() else ""
            pytest.skip(f"the Slurm node did not become idle in 60 s (sinfo: {state!r}); slurmctld log: {logs}")
        yield cpus, conf
    finally:
        _run("scontrol", "shutdown")  # slurmctld and slurmd
        time.sleep(1)
        pid = d / "munge" / "munged.pid"
        if pid.exists():
            try:
                os.kill(int(pid.read_text().strip()), 15)
            except (ProcessLookupError, ValueError):
                pass
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def test_a_study_runs_as_a_slurm_job_and_an_impossible_request_fails_fast(cluster, outputs, capsys):
    cpus, _ = cluster
    code = reproduce.main(["--profile", "tiny", "--only", "hardware", "--submit", "slurm",
                           "--slurm-partition", "debug", "--slurm-cpus", str(min(2, cpus)), "--slurm-mem-gb", "4"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "submitted hardware: job " in err and f"(slurm: {min(2, cpus)} CPUs, 4 GB, 0 GPUs" in err
    assert any((outputs / "tiny" / "runs" / "hardware").glob("*.json")), "no hardware record from the job"
    assert "hardware  ok" in out
    # more CPUs than the node has: cancelled (or refused) within a minute, one line naming request and offer
    t0 = time.monotonic()
    code = reproduce.main(["--profile", "tiny", "--only", "hardware", "--force", "--submit", "slurm",
                           "--slurm-cpus", str(cpus * 32)])
    out, err = capsys.readouterr()
    assert code == 1 and time.monotonic() - t0 < 60, (out, err)
    line = next(ln for ln in err.splitlines() if ln.startswith("hardware: "))
    assert (("Slurm cannot start job" in line or "slurm refused the job" in line)
            and f"asked {cpus * 32} CPUs" in line and f"offers {cpus} CPUs" in line), line
    assert _run("squeue", "-h").stdout.strip() == ""  # nothing left behind in the queue


class _Job:
    """What the watcher reads of a submitit job: its id and its result file."""

    def __init__(self, job_id, result):
        self.job_id, self.paths = job_id, type("Paths", (), {"result_pickle": result})()

    def cancel(self, check=False):
        raise AssertionError("the watcher cancelled a job it should have waited for")


def _squeue(answers):
    """A stand-in for subprocess.run that plays squeue's answers in turn: (exit code, stdout, stderr) or an
    exception to raise."""
    def run(cmd, **kw):
        assert cmd[0] == "squeue"
        a = answers.pop(0)
        if isinstance(a, BaseException):
            raise a
        return subprocess.CompletedProcess(cmd, a[0], a[1], a[2])
    return run


def test_a_failing_squeue_is_not_an_empty_queue(monkeypatch, tmp_path):
    """squeue's nonzero exit or timeout raises SlurmUnavailable (it used to read as "every job ended"); ids Slurm
    has forgotten ("Invalid job id") are ended jobs; the watcher retries a failing squeue and, past its grace
    period, stops with one line naming the jobs it leaves (reproduce: exit 1)."""
    from effllm_utils.cli import slurm

    monkeypatch.setattr(slurm.subprocess, "run", _squeue([
        (1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"),
        subprocess.TimeoutExpired(["squeue"], 30),
        (1, "", "slurm_load_jobs error: Invalid job id specified\n"),
        (0, "41|RUNNING|None\n", "")]))
    with pytest.raises(slurm.SlurmUnavailable, match="squeue exited 1: slurm_load_jobs error: Unable to contact"):
        slurm.queue(["41"])
    with pytest.raises(slurm.SlurmUnavailable, match="did not answer in 30 s"):
        slurm.queue(["41"])
    assert slurm.queue(["41"]) == {}
    assert slurm.queue(["41"]) == {"41": ("RUNNING", "None")}

    done = tmp_path / "result.pkl"
    job = _Job("41", done)
    # running, then squeue fails twice, then the job is gone and its result written: waited for, not dropped
    answers = [(0, "41|RUNNING|None\n", ""), (1, "", "connect failure"), (1, "", "connect failure"), (0, "", "")]
    monkeypatch.setattr(slurm.subprocess, "run", _squeue(answers))
    monkeypatch.setattr(slurm.time, "sleep", lambda s: done.write_bytes(b"x") if len(answers) == 1 else None)
    assert slurm.watch({"attention": job}, {"attention": {}}, poll_s=0) == {} and answers == []

    monkeypatch.setattr(slurm.subprocess, "run", _squeue([(1, "", "connect failure")] * 3))
    with pytest.raises(slurm.SlurmUnavailable) as e:
        slurm.watch({"attention": _Job("42", tmp_path / "none.pkl")}, {"attention": {}}, poll_s=0,
                    squeue_grace_s=-1)
    assert "squeue exited 1: connect failure" in str(e.value) and "attention (42) may still be queued" in str(e.value)
