import shutil
from pathlib import Path

import nbformat
import pytest

from effllm_utils import PROFILES
from effllm_utils.core import params
from effllm_utils.core.params import ParamsError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def root(tmp_path):
    """A checkout with the real hardware notebook and an editable tiny params file."""
    (tmp_path / "notebooks").mkdir()
    shutil.copy(REPO / "notebooks" / "hardware.ipynb", tmp_path / "notebooks")
    (tmp_path / "params" / "tiny").mkdir(parents=True)
    return tmp_path


def write(root, text):
    path = root / "params" / "tiny" / "hardware.yaml"
    path.write_text(text)
    return path


def test_every_shipped_params_file_validates_and_holds_only_what_differs():
    """A params file holds only what differs from its notebook's parameters cell (the schema): tiny's are empty."""
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        specs = params.notebook_parameters(nb)
        for profile in PROFILES:
            values = params.study_params(nb.stem, profile)
            same = [k for k, v in values.items() if v == specs[k].default]
            assert not same, f"{profile}/{nb.stem}.yaml repeats the notebook's defaults for {same}"
            if profile == "tiny":
                assert values == {}, f"tiny/{nb.stem}.yaml: the notebook's defaults are the tiny profile"


def test_named_scales_resolve_to_their_dimensions():
    from effllm_utils import models
    from effllm_utils.models import techniques

    P = params.effective("attention", params.study_params("attention", "paper"))
    dims = techniques.scales(P)
    assert dims["1.5B"] == models.SCALES["qwen2.5-1.5b"] and dims["1.5B"]["hidden_size"] == 1536
    assert models.scale_dims({"scale": "qwen2.5-0.5b", "ce_chunk": 1024})["ce_chunk"] == 1024
    with pytest.raises(ValueError, match="unknown scale name 'qwen9'; known: qwen2.5-0.5b"):
        models.scale_dims("qwen9", "scales['x']")


def test_values_are_checked_and_ints_widen_to_float(root):
    write(root, "idle_s: 2\nmatmul_sizes: [64]\n")
    values = params.study_params("hardware", "tiny", root)
    assert values == {"idle_s": 2.0, "matmul_sizes": [64]} and isinstance(values["idle_s"], float)


@pytest.mark.parametrize("text,message", [
    ("idle_seconds: 3\n", r"hardware\.yaml: unknown key 'idle_seconds'; the notebook declares device, dtypes"),
    ("idle_s: fast\n", r"hardware\.yaml: key 'idle_s' must be float, got str 'fast'"),
    ("overhead_pairs: true\n", r"key 'overhead_pairs' must be int, got bool True"),
    ("matmul_sizes: 1024\n", r"key 'matmul_sizes' must be list, got int 1024"),
    ("idle_s: [1\n", r"hardware\.yaml: malformed YAML"),
    ("- a\n- b\n", r"hardware\.yaml: must be a mapping of key: value, not a list"),
    ("profile: gpu\n", r"key 'profile' is set by the runner"),
])
def test_bad_params_files_name_the_file_and_key(root, text, message):
    write(root, text)
    with pytest.raises(ParamsError, match=message):
        params.study_params("hardware", "tiny", root)


def test_missing_file_unknown_study_and_profile(root):
    with pytest.raises(ParamsError, match=r"params/tiny/hardware\.yaml: params file not found"):
        params.study_params("hardware", "tiny", root)
    with pytest.raises(ValueError, match="unknown study 'hardwear'"):
        params.study_params("hardwear", "tiny", root)
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        params.study_params("hardware", "huge", root)


def test_from_namespace_in_a_notebook(root):
    specs = params.notebook_parameters(root / "notebooks" / "hardware.ipynb")
    ns = {k: s.default for k, s in specs.items()}
    values = params.from_namespace("hardware", ns, root)
    assert "profile" not in values and "force" not in values and values["idle_s"] == 3.0
    with pytest.raises(ParamsError, match="must be float, got str"):
        params.from_namespace("hardware", ns | {"idle_s": "x"}, root)
    with pytest.raises(ParamsError, match=r"parameter\(s\) \['idle_s'\] not defined"):
        params.from_namespace("hardware", {k: v for k, v in ns.items() if k != "idle_s"}, root)


def _notebook(path, source):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(nb, path)
    return path


def test_parameters_cell_problems_are_caught(tmp_path):
    ok = _notebook(tmp_path / "a.ipynb", 'x: int = 1  # a count\ny: Optional[float] = None  # a value\nz = "s"  # s\n')
    specs = params.notebook_parameters(ok)
    assert specs["y"].types == (float, type(None)) and specs["z"].types == (str,) and specs["x"].help == "a count"
    assert params.check_value("y", None, specs["y"], "f") is None
    bad = _notebook(tmp_path / "b.ipynb", "x: int = 1  # a=b confuses papermill\n")
    with pytest.raises(ParamsError, match=r"papermill cannot parse the parameters line\(s\) for \['x'\]"):
        params.notebook_parameters(bad)
    none = _notebook(tmp_path / "c.ipynb", "x = None  # no type\n")
    with pytest.raises(ParamsError, match="needs an annotation"):
        params.notebook_parameters(none)


# Learning rates as researchers write them: YAML 1.1 (PyYAML) reads `1e-4` as a string; effllm reads it as a float.
@pytest.mark.parametrize("text,value", [("1e-4", 1e-4), ("3e-4", 3e-4), ("5E-5", 5e-5), ("-2.5e+3", -2500.0),
                                        ("1.5", 1.5), ("2", 2)])
def test_scientific_notation_in_a_params_file(root, text, value):
    write(root, f"idle_s: {text}\ntelemetry_period_s: {text}\n")
    values = params.study_params("hardware", "tiny", root)
    assert values["idle_s"] == value and isinstance(values["idle_s"], float)


def test_scientific_notation_in_set_overrides(root):
    assert params.parse_overrides(["lr=1e-4", "b=5E-5", "c=[3e-4, 2]", "d=v1e5", "e='1e-4'"]) == \
        {"lr": 1e-4, "b": 5e-5, "c": [3e-4, 2], "d": "v1e5", "e": "1e-4"}
    write(root, "")
    out = params.with_overrides("hardware", {}, params.parse_overrides(["idle_s=1e-1"]), root)
    assert out == {"idle_s": 0.1}


def test_scientific_notation_in_the_parameters_cell(tmp_path):
    nb = _notebook(tmp_path / "lr.ipynb", "lr: float = 1e-4  # learning rate\nlr_adapter = 5E-5  # adapters\n")
    specs = params.notebook_parameters(nb)
    assert specs["lr"].default == 1e-4 and specs["lr"].types == (float,)
    assert specs["lr_adapter"].default == 5e-5 and specs["lr_adapter"].types == (float,)
    assert params.validate({"lr": 3e-4}, specs, "cell") == {"lr": 3e-4}
