"""Code versions: a study's records go stale when code it imports changes, and only then."""
import dataclasses
import json
from pathlib import Path

import pytest

from effllm_utils.core import provenance
from effllm_utils.studies import registry

ROOT = Path(provenance.__file__).resolve().parents[1]


def _rel(files) -> set[str]:
    return {f.relative_to(ROOT).as_posix() for f in files}


def test_imports_are_read_from_the_whole_module_relative_and_importlib_included(tmp_path):
    pkg = tmp_path / "effllm_utils"
    for d in ("engine", "models"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    for name in ("b", "d", "e"):
        (pkg / "engine" / f"{name}.py").write_text("")
    (pkg / "models" / "c.py").write_text("")
    (pkg / "engine" / "a.py").write_text(
        "import importlib\n"
        "import numpy\n"
        "from effllm_utils.engine import b, CONSTANT\n"
        "from .d import something\n"
        "def lazy():\n"
        "    from effllm_utils.engine.e import f\n"
        "    return importlib.import_module('effllm_utils.models.c')\n")
    got = {f.relative_to(pkg).as_posix() for f in provenance._imports(pkg / "engine" / "a.py", pkg)}
    assert got == {"engine/__init__.py", "engine/b.py", "engine/d.py", "engine/e.py", "models/__init__.py",
                   "models/c.py"}


def test_a_study_hashes_the_measuring_modules_it_imports_and_no_others():
    attention = _rel(provenance.code_files("attention"))
    assert {"studies/pretraining.py", "engine/train.py", "models/modeling.py", "measure/telemetry.py",
            "data/__init__.py"} <= attention
    assert not attention & {"engine/decode.py", "engine/quantize.py", "engine/infer.py", "studies/quantization.py"}
    quantization = _rel(provenance.code_files("quantization"))
    assert {"studies/quantization.py", "engine/quantize.py", "engine/decode.py", "engine/infer.py"} <= quantization
    assert {"core/runtime.py", "data/corpus.jsonl.xz"} <= attention & quantization  # seeding, timers; the corpus
    assert not {f for f in attention | quantization if f.startswith("core/")} - {"core/runtime.py"}
    assert all(f.split("/")[0] in ("studies", "core", *provenance._MEASURING_LAYERS) for f in attention | quantization)
    hardware = provenance.code_files("hardware")  # no run function: all of the measuring layers and its notebook
    every = _rel(f for f in hardware if f.is_relative_to(ROOT))
    assert attention - {"studies/pretraining.py"} < every and "engine/decode.py" in every
    assert [f.name for f in hardware if not f.is_relative_to(ROOT)] == ["hardware.ipynb"]
    assert len({provenance.code_version(s) for s in ("attention", "moe", "depth_width")}) == 1  # one run function


def test_a_run_function_named_by_its_full_dotted_path_is_found(monkeypatch):
    entry, relative = registry.get("quantization"), provenance.code_files("quantization")
    monkeypatch.setattr(registry, "get", lambda study: dataclasses.replace(
        entry, run="effllm_utils.studies.quantization:run_study"))
    provenance.code_files.cache_clear()
    try:
        assert provenance.code_files("quantization") == relative
    finally:
        provenance.code_files.cache_clear()


@pytest.fixture
def edited(monkeypatch):
    """Pretend one module's code changed: returns a function that edits the given relative path."""
    real = provenance._source_digest

    def edit(rel: str) -> None:
        monkeypatch.setattr(provenance, "_source_digest",
                            lambda path: "edited" if Path(path) == ROOT / rel else real(path))
        provenance.code_version.cache_clear()

    yield edit
    provenance.code_version.cache_clear()


def test_editing_the_decoder_stales_quantization_records_not_pretraining_ones(edited):
    before = {s: provenance.code_version(s) for s in registry.names()}
    edited("engine/decode.py")
    after = {s: provenance.code_version(s) for s in registry.names()}
    assert after["quantization"] != before["quantization"] and after["hardware"] != before["hardware"]
    assert after["attention"] == before["attention"] and after["peft"] == before["peft"]
    edited("engine/train.py")
    assert provenance.code_version("attention") != before["attention"]
    edited("core/runtime.py")  # seeding, timer synchronization, memory release
    assert provenance.code_version("attention") != before["attention"]
    edited("data/corpus.jsonl.xz")  # the shipped corpus, by its bytes
    assert provenance.code_version("attention") != before["attention"]
    edited("core/runs.py")  # record plumbing: not a measurement
    assert provenance.code_version("attention") == before["attention"]


def test_the_hardware_notebooks_code_cells_are_its_code_and_comments_are_not(tmp_path):
    nb = json.loads((ROOT.parent / "notebooks" / "hardware.ipynb").read_text())
    path = tmp_path / "hardware.ipynb"
    path.write_text(json.dumps(nb))
    digest = provenance._source_digest.__wrapped__
    base = digest(str(path))
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["source"] = ["# a new comment\n", "%matplotlib inline\n", *code["source"]]
    path.write_text(json.dumps(nb))
    assert digest(str(path)) == base
    code["source"] = [*code["source"], "\nx = 1\n"]
    path.write_text(json.dumps(nb))
    assert digest(str(path)) != base
    nb["cells"].append({"cell_type": "code", "metadata": {}, "outputs": [], "source": ["%%bash\n", "ls -l\n"]})
    path.write_text(json.dumps(nb))  # a cell Python cannot parse is hashed by its text, not a crash
    assert digest(str(path)) not in (base, digest(str(tmp_path / "gone.ipynb"))) and digest(str(tmp_path / "x")) == \
        "missing"


def test_the_other_cpu_share_is_busy_time_less_the_jobs_own_over_the_cpus_time():
    # snapshots: (busy CPU s, total CPU s, {pid: CPU s of the job's processes}, reaped children's CPU s)
    start = (100.0, 400.0, {1: 10.0, 2: 5.0}, 1.0)
    n = len(provenance.os.sched_getaffinity(0)) if hasattr(provenance.os, "sched_getaffinity") else 1
    total = 4.0 * n  # 4 s of wall time on every CPU
    # the job used 1.5 (pid 1) + 0.5 (pid 3, a worker born in the window) + 0.5 (a reaped child); others 1.0
    end = (100.0 + 3.5, 400.0 + total, {1: 11.5, 3: 0.5}, 1.5)
    assert provenance.other_cpu_share(start, end) == pytest.approx(1.0 / total)
    assert provenance.other_cpu_share(start, (100.0 + total, 400.0 + total, {1: 10.0}, 1.0)) == 1.0  # all others'
    assert provenance.other_cpu_share(start, (100.0 + 2.0, 400.0 + total, {1: 13.0}, 1.0)) == 0.0  # never negative
    assert provenance.other_cpu_share(start, (100.1, 400.0 + 0.5 * n, {1: 10.1}, 1.0)) is None  # too short to tell
    assert provenance.other_cpu_share(None, end) is None
    assert provenance._proc_cpu_s("42 (a (weird) name) S 7 42 42 0 -1 0 0 0 0 0 250 50 3 4 20 0") == (
        7, pytest.approx(300 / provenance.os.sysconf("SC_CLK_TCK")))


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux's /proc")
def test_host_load_counts_other_processes_not_the_jobs_own_children():
    import os
    import subprocess
    import sys
    import time

    with provenance.HostLoad() as idle:
        time.sleep(1.0)
    if idle.other_cpu_frac is None or idle.other_cpu_frac > 0.2:
        pytest.skip(f"the host is busy ({idle.other_cpu_frac}): the live check needs it to itself")
    n = len(os.sched_getaffinity(0))
    spin = "import time\nend = time.monotonic() + {}\nwhile time.monotonic() < end: pass"
    with provenance.HostLoad() as own:  # a child of this process spinning: the job's own work
        child = subprocess.Popen([sys.executable, "-c", spin.format(1.5)])
        time.sleep(1.2)
    child.wait()
    # a process outside the job (started in its own session by a helper that exits at once: not a descendant)
    outside = f"import subprocess, sys\np = subprocess.Popen([sys.executable, '-c', {spin.format(6)!r}], " \
              "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\nprint(p.pid)"
    helper = subprocess.run([sys.executable, "-c", outside], capture_output=True, text=True, check=True)
    other_pid = int(helper.stdout)
    try:
        time.sleep(0.5)
        with provenance.HostLoad() as shared:
            time.sleep(1.2)
    finally:
        os.kill(other_pid, 9)
    assert own.other_cpu_frac < 0.5 / n  # its own child is not other work
    assert shared.other_cpu_frac > 0.6 / n  # one outside process spinning: ~1 / n of the CPUs


def test_every_record_says_how_much_other_work_shared_its_cpus_and_the_report_lists_those_above_a_share(outputs):
    from effllm_utils.core import runs
    from effllm_utils.report import webpage

    rec = runs.execute("attention", "gqa", "tiny", {"seed": 0}, lambda: {"quality": {"ppl": 1.0}}, verbose=False)
    frac = rec.environment["host_other_cpu_frac"]
    assert frac is None or 0 <= frac <= 1
    assert runs.load_records("tiny", "attention")[0].environment["host_other_cpu_frac"] == frac  # stored
    assert "shared the CPUs" not in webpage._warnings("tiny", ["attention"]) or frac > provenance.SHARED_CPU_WARN
    rec.environment["host_other_cpu_frac"] = 0.5
    runs.write_record(rec)
    page = webpage._warnings("tiny", ["attention"])
    assert "Runs that shared the CPUs" in page and f"{rec.run_id}: 50%" in page
    assert [r.run_id for r in provenance.shared_cpu(runs.load_records("tiny", "attention"))] == [rec.run_id]


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux's /proc/stat")
def test_a_batch_warns_in_one_line_when_other_work_is_using_the_cpus(capsys, monkeypatch):
    from effllm_utils.cli import reproduce

    class Busy(provenance.HostLoad):
        def __exit__(self, *exc):
            self.other_cpu_frac = 0.6
            return False

    monkeypatch.setattr(provenance, "HostLoad", Busy)
    assert reproduce.busy_host_warning(0.01) == 0.6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: other processes are using 60% of this host's CPUs")
    monkeypatch.setattr(Busy, "__exit__", lambda self, *exc: setattr(self, "other_cpu_frac", 0.05))
    assert reproduce.busy_host_warning(0.01) == 0.05 and capsys.readouterr().err == ""
