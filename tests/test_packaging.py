"""The install story: pyproject and environment.yml agree; CI runs the README's test command; notebooks clean."""
import json
import re
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower()


def _lock_pins(path: Path) -> dict[str, list[str]]:
    pins: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, rest = line.strip().partition("==")
            pins.setdefault(name.lower(), []).append(rest.split(";")[0].strip())  # the version, marker dropped
    return pins


def test_lock_pins_every_declared_dependency_exactly():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _lock_pins(REPO / "requirements.lock")
    assert all(rest and rest[0].isdigit() for versions in pins.values() for rest in versions)  # name==version only
    declared = [_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    missing = [n for n in declared if n not in pins and n not in ("torch", "tomli")]
    assert not missing, f"not in requirements.lock (run make lock): {missing}"
    assert "torch" not in pins  # installed first by the Makefile (TORCH_SPEC), never by the lock
    assert not [n for n in pins if n.startswith("nvidia-") and n != "nvidia-ml-py"]  # no CUDA wheels in a CPU lock
    lab = _lock_pins(REPO / "requirements-lab.lock")
    assert "jupyterlab" in lab and all(set(lab[n]) <= set(v) for n, v in pins.items() if n in lab)  # same versions


def test_environment_yml_follows_the_lock():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    lock = [line.strip() for line in (REPO / "requirements.lock").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert [p for p in pip if not p.startswith(("--", "torch=="))] == lock
    assert any(p.startswith("torch==") for p in pip)


def test_makefile_installs_the_lock_without_resolving():
    make = (REPO / "Makefile").read_text()
    assert "--no-deps -r $(LOCK)" in make and "LOCK := requirements.lock" in make
    assert re.search(r"^lock:", make, re.M) and re.search(r"^test-latest:", make, re.M)


def test_torch_is_installed_pinned_before_the_package():
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^TORCH_SPEC \?= torch==\d", make, re.M)
    assert make.index("$(TORCH_SPEC)") < make.index("-r $(LOCK)")
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text()


def test_notebooks_are_committed_without_outputs():
    for nb in (REPO / "notebooks").glob("*.ipynb"):
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, nb.name


def test_gpu_session_script_parses_and_refuses_unknown_steps(tmp_path):
    import subprocess

    script = REPO / "scripts" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), "nosuchstep"], capture_output=True, text=True, cwd=REPO,
                       env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    steps = "tests decode decode05 dtrace train tuned levers trace hardware study"
    assert f"unknown step nosuchstep; steps: {steps}" in r.stderr


def test_compare_outputs_finds_changed_quality_and_missing_records(tmp_path):
    import subprocess
    import sys

    def write(folder, ppl, params=100, extra=False):
        runs_dir = folder / "runs" / "attention"
        runs_dir.mkdir(parents=True, exist_ok=True)
        recs = [("gqa", ppl, params)] + ([("mla", 1.0, 1)] if extra else [])
        for tech, q, n in recs:
            (runs_dir / f"attention--{tech}.json").write_text(json.dumps({
                "study": "attention", "technique": tech, "scale": "tiny", "status": "ok", "params": {"seed": 0},
                "quality": {"ppl": q}, "metrics": {"params": n, "al_s": 0.1 * q}, "started_at": "2026"}))
        return folder

    def run(a, b):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "compare_outputs.py"), str(a), str(b)],
                              capture_output=True, text=True)

    a, same, other = write(tmp_path / "a", 10.0), write(tmp_path / "b", 10.0), write(tmp_path / "c", 10.5, 101, True)
    ok = run(a, same)
    assert ok.returncode == 0 and "1 records: quality and deterministic metrics equal" in ok.stdout
    bad = run(a, other)
    assert bad.returncode == 1
    assert "quality.ppl: 10.0 -> 10.5" in bad.stdout and "metrics.params: 100 -> 101" in bad.stdout
    assert "only in" in bad.stdout and "'mla'" in bad.stdout and "al_s" not in bad.stdout  # timings not compared
    assert run(a, tmp_path / "nowhere").returncode == 2


def test_lock_script_refuses_unknown_arguments():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(REPO / "scripts" / "lock.py"), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument(s) ['--bogus']; the only option is --upgrade" in r.stderr
