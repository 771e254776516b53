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
    return re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | {r for extra in project["optional-dependencies"].values() for r in extra}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(declared)  # same packages, same version bounds
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.removeprefix("python") == project["requires-python"]


def test_torch_is_installed_pinned_before_the_package():
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^TORCH_SPEC \?= torch==\d", make, re.M)
    assert make.index("$(TORCH_SPEC)") < make.index('-e ".[dev]"')
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
