"""Study parameters: `params/<profile>/<study>.yaml`, validated against the notebook's parameters cell.

The notebook's cell tagged `parameters` is the schema: each `name: type = default  # help` line declares a key,
its type (the annotation, else the type of the default) and its meaning. A YAML file may set any of those keys;
an unknown key, a wrong type, a malformed file or a missing file is a `ParamsError` (a ValueError) whose message
names the file and the key. `profile` and `force` are set by the runner, not by the YAML files.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from effllm_utils import check_profile, check_study, repo_root

RUNNER_KEYS = ("profile", "force")  # injected by effllm_utils.cli.reproduce; not part of a run's identity
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict, "None": type(None)}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: PyYAML follows YAML 1.1, where a float needs a dot, so `1e-4`,
    `3e-4` and `5E-5` (learning rates as researchers write them) would be read as strings."""


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """YAML as effllm reads it everywhere (params files, --set, reference/claims.yaml): `1e-4` is a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ParamsError(ValueError):
    """A params file or parameters cell that cannot be used; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str
    types: tuple[type, ...]
    default: Any
    help: str

    @property
    def type_names(self) -> str:
        return " | ".join("None" if t is type(None) else t.__name__ for t in self.types)


def notebook_path(study: str, root: Path | None = None) -> Path:
    return (root or repo_root()) / "notebooks" / f"{check_study(study)}.ipynb"


def params_path(profile: str, study: str, root: Path | None = None) -> Path:
    return (root or repo_root()) / "params" / check_profile(profile) / f"{check_study(study)}.yaml"


def _parse_types(annotation: str, default: Any, where: str) -> tuple[type, ...]:
    """Plain builtin annotations (`int`, `list[int]`) or `Optional[T]`; without one, the default's type.
    (papermill's parser does not accept `T | None`, so `Optional[T]` it is.)"""
    if annotation and annotation != "None":
        optional = annotation.startswith("Optional[") and annotation.endswith("]")
        base = (annotation[len("Optional["):-1] if optional else annotation).split("[", 1)[0].strip()
        if base not in _TYPES:
            raise ParamsError(f"{where}: annotation {annotation!r} is not a plain type "
                              f"({', '.join(_TYPES)} or Optional[...] of one)")
        return (_TYPES[base], type(None)) if optional else (_TYPES[base],)
    if default is None:
        raise ParamsError(f"{where}: a parameter whose default is None needs an annotation, e.g. "
                          f"`x: Optional[float] = None`")
    return (type(default),)


def _assigned_names(nb_path: Path) -> list[str] | None:
    """Names the parameters cell assigns, by Python's own parser (to catch lines papermill cannot parse)."""
    import nbformat

    nb = nbformat.read(str(nb_path), as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        return None
    names = []
    for node in ast.parse(cell.source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def notebook_parameters(nb_path: str | Path) -> dict[str, ParamSpec]:
    """The parameters cell of a notebook as {name: ParamSpec} (papermill's inspect_notebook does the parsing)."""
    from papermill.inspection import inspect_notebook

    nb_path = Path(nb_path)
    if not nb_path.is_file():
        raise ParamsError(f"{nb_path}: notebook not found")
    specs = {}
    for name, p in inspect_notebook(str(nb_path)).items():
        where = f"{nb_path} parameter {name!r}"
        try:
            default = ast.literal_eval(p["default"])
        except (ValueError, SyntaxError):
            raise ParamsError(f"{where}: default {p['default']!r} is not a plain literal") from None
        specs[name] = ParamSpec(name, _parse_types(p["inferred_type_name"], default, where), default, p["help"])
    assigned = _assigned_names(nb_path)
    if assigned is None:
        raise ParamsError(f"{nb_path}: no cell tagged 'parameters'")
    lost = [n for n in assigned if n not in specs]
    if lost:
        raise ParamsError(f"{nb_path}: papermill cannot parse the parameters line(s) for {lost}; write each as "
                          f"`name: type = literal  # help` on one line, with no '=' in the comment")
    return specs


def check_value(key: str, value: Any, spec: ParamSpec, source: str) -> Any:
    """Return the value (ints widened to float where a float is declared) or raise naming the key and source."""
    ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in spec.types)
    if not ok and float in spec.types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ParamsError(f"{source}: key {key!r} must be {spec.type_names}, got {type(value).__name__} "
                          f"{value!r}")
    return value


def validate(values: dict[str, Any], specs: dict[str, ParamSpec], source: str) -> dict[str, Any]:
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ParamsError(f"{source}: unknown key {unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
                          + f"; the notebook declares {', '.join(k for k in specs if k not in RUNNER_KEYS)}")
    return {k: check_value(k, v, specs[k], source) for k, v in values.items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (each study needs params/<profile>/<study>.yaml)")
    try:
        data = read_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: malformed YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: must be a mapping of key: value, not a {type(data).__name__}")
    return data


JOB_KEY = "slurm"  # a params file's block for the job that runs the study (cli/slurm.py), not a notebook parameter


def study_params(study: str, profile: str, root: Path | None = None) -> dict[str, Any]:
    """The validated values of params/<profile>/<study>.yaml (keys it leaves out keep the notebook default; its
    `slurm:` block is the job's, see `job_block`)."""
    path = params_path(profile, study, root)
    values = load_yaml(path)
    values.pop(JOB_KEY, None)
    for key in RUNNER_KEYS:
        if key in values:
            raise ParamsError(f"{path}: key {key!r} is set by the runner (from the file's folder and --force), "
                              f"remove it from the file")
    return validate(values, notebook_parameters(notebook_path(study, root)), str(path))


def job_block(study: str, profile: str, root: Path | None = None) -> tuple[Any, str]:
    """(the `slurm:` block of params/<profile>/<study>.yaml or None, the file's path)."""
    path = params_path(profile, study, root)
    return load_yaml(path).get(JOB_KEY), str(path)


def effective(study: str, values: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    """Every parameter a run of `study` sees: the notebook's defaults with `values` (a params file's and --set's
    differences) applied, runner keys left out. What the notebook's `P` holds; what --dry-run checks."""
    specs = notebook_parameters(notebook_path(study, root))
    return {k: s.default for k, s in specs.items() if k not in RUNNER_KEYS} | values


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (VALUE read as a YAML value: 200, true, "text", {"a": 1}) into a dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"--set {pair!r}: write KEY=VALUE, e.g. --set steps=200")
        try:
            out[key.strip()] = read_yaml(raw)
        except yaml.YAMLError as e:
            raise ParamsError(f"--set {pair!r}: VALUE is not a YAML value: {' '.join(str(e).split())}") from None
    return out


def with_overrides(study: str, values: dict[str, Any], overrides: dict[str, Any],
                   root: Path | None = None) -> dict[str, Any]:
    """A study's params with command-line overrides applied, each checked against the notebook's declaration."""
    bad = [k for k in overrides if k in RUNNER_KEYS]
    if bad:
        raise ParamsError(f"--set {bad[0]}: set by the runner (use --profile / --force)")
    return values | validate(overrides, notebook_parameters(notebook_path(study, root)), f"--set for {study}")


def from_namespace(study: str, namespace: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    """In a notebook: the current values of its declared parameters (minus runner keys), type-checked.

    Works the same under papermill and in JupyterLab after a researcher edits the parameters cell."""
    nb = notebook_path(study, root)
    specs = notebook_parameters(nb)
    missing = [k for k in specs if k not in namespace]
    if missing:
        raise ParamsError(f"{nb}: parameter(s) {missing} not defined; run the parameters cell first")
    values = {k: namespace[k] for k in specs}
    check_profile(values.get("profile", "tiny"))
    checked = validate(values, specs, f"{nb} (parameters cell)")
    return {k: v for k, v in checked.items() if k not in RUNNER_KEYS}
