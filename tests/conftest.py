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
