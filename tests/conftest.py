import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    """Records, figures and notebooks of this test go to a temp folder."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("EFFLLM_OUTPUTS", str(out))
    return out


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    os.environ["EFFLLM_CACHE"] = str(tmp_path_factory.mktemp("effllm-cache"))


@pytest.fixture
def tiny_package(tmp_path, monkeypatch):
    """An importable module `tiny_gguf_pkg` holding tiny.gguf (written by the gguf package: a tiny Llama, Q4_1),
    registered as the packaged model 'tiny-gguf' (models.packaged); returns the model and tokenizer it was written from."""
    from effllm_utils.models import packaged
    from helpers import gguf_tiny

    tok = gguf_tiny.tokenizer()
    model = gguf_tiny.llama(len(tok))
    pkg = tmp_path / "site" / "tiny_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    gguf_tiny.write(pkg / "tiny.gguf", model, tok)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sys.modules.pop("tiny_gguf_pkg", None)
    monkeypatch.setitem(packaged.PACKAGED, "tiny-gguf", packaged.Packaged(
        "tiny-gguf-pkg", "0.0.1", "tiny_gguf_pkg", "tiny.gguf", "MIT", "tiny test model, Q4_1 GGUF dequantized"))
    return model, tok
