"""Precisions of one model: fp32/fp16/bf16 casts, torchao int8 weight-only, GPTQModel int4 (GPTQ and calibration-free
RTN), each saved and reloaded; sizes in memory and on disk; lm-eval tasks; which decode path each precision runs.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from effllm_utils import check_choices, data
from effllm_utils.measure import telemetry

DECODE_CHOICES = ("eager", "static")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4_gptq", "int4_rtn")
NOMINAL_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4_gptq": 4, "int4_rtn": 4}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PrecisionUnsupported(RuntimeError):
    """A precision that cannot run, or runs incorrectly, on this device (e.g. fp16 overflow)."""


def memory_bytes(model) -> int:
    """The model's bytes in memory: its distinct parameter and buffer storages (tied embeddings once; quantized
    tensor subclasses by their inner tensors)."""
    return telemetry.held_bytes(model)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def calibration_texts(tok, n: int, length: int) -> list[str]:
    """`n` windows of `length` tokens of the training split, decoded (GPTQ calibration data)."""
    ids = data.token_ids("train", tok)
    starts = torch.linspace(0, len(ids) - length - 1, n).long().tolist()
    return [tok.decode(ids[s:s + length]) for s in starts]


def build(precision: str, src: Path, tok, P: dict[str, Any], device: str, work: Path, calib: list[str] | None = None):
    """Quantize/cast the checkpoint at `src`, save it under work/<precision>, reload it: (model, info). `calib`:
    GPTQ's calibration texts (default: P's number of windows of the shipped training split)."""
    from transformers import AutoModelForCausalLM

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise PrecisionUnsupported(f"bf16 is not supported by {torch.cuda.get_device_name()}; skip it on this GPU")
    out = work / precision
    shutil.rmtree(out, ignore_errors=True)
    probe = data.token_ids("validation", tok)[:64][None]

    def logits(m):
        with torch.no_grad():
            return m(input_ids=probe.to(next(m.parameters()).device), use_cache=False).logits.float().cpu()

    if precision in DTYPES:
        before = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[precision])
        expected = logits(before)
        before.save_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=DTYPES[precision])
    elif precision == "int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        before = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                      quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
        expected = logits(before)
        before.save_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out)
    else:
        model = _gptqmodel_int4(precision, src, tok, P, device, out, calib)
        expected = None  # GPTQModel packs the weights on save: the reloaded model is the first runnable one
    model = model.to(device).eval()
    got = logits(model)
    if not torch.isfinite(got).all():
        raise PrecisionUnsupported(f"{precision}: non-finite logits on validation text (overflow); this model cannot "
                                   f"run in {precision} without rescaling")
    diff = None if expected is None else float((got - expected).abs().max())
    if diff is not None and diff > 1e-4 * max(1.0, float(expected.abs().max())):
        raise RuntimeError(f"{precision}: the reloaded checkpoint differs from the model before saving "
                           f"(max |logit difference| {diff:.3g})")
    return model, {"disk_bytes": disk_bytes(out), "memory_bytes": memory_bytes(model), "path": str(out),
                   "reload_max_abs_diff": diff}


def _gptqmodel_int4(precision: str, src: Path, tok, P: dict[str, Any], device: str, out: Path,
                    calib: list[str] | None = None):
    """GPTQModel's 4-bit GPTQ (calibrated on the training split) or RTN of `src`, saved to `out` and reloaded.
    GPTQModel's per-module INFO tables are held back (its progress bars stay): thousands of lines per model."""
    import logging

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import WeightOnlyConfig

    kw = {"weight_only": WeightOnlyConfig(method="rtn")} if precision == "int4_rtn" else {}
    cpu = device == "cpu"
    # on CPU the calibration forwards run in fp32 (GPTQModel's default bf16 is slow without AVX-512-BF16) and
    # finished layers stay in memory (no disk offload): SmolLM2-135M's GPTQ took 240 s, 82 s so
    log = logging.getLogger("logbar")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        qm = GPTQModel.load(str(src), QuantizeConfig(bits=4, group_size=P["group_size"], **kw,
                                                     **({"offload_to_disk": False} if cpu else {})),
                            device=device, **({"dtype": torch.float32} if cpu else {}))
        if precision == "int4_gptq" and calib is None:
            calib = calibration_texts(tok, P["calibration_samples"], P["calibration_len"])
        qm.quantize(calib if precision == "int4_gptq" else None, batch_size=4)
        if cpu:  # store the unquantized tensors (embeddings, norms) in bf16, as a bf16 load would have
            _floats_to_bf16(qm.model)
        qm.save(str(out))
        return GPTQModel.load(str(out), device=device).model
    finally:
        log.setLevel(level)


def _floats_to_bf16(model) -> None:
    """Cast a quantized model's fp32 parameters (embeddings, norms, a float head) to bf16 and say so in its config;
    the packed int4 tensors and their fp16 scales are buffers and stay as they are."""
    for p in model.parameters():
        if p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16


# The metric read from each lm-eval task, first match wins (the paper's six leaderboard tasks use these).
_METRICS = ("acc_norm,none", "acc,none", "exact_match,none", "prompt_level_strict_acc,none")


def evaluate_tasks(model, tok, tasks: list[str], limit: int | None, include_path: str = "",
                   batch_size: int = 8) -> dict[str, float]:
    """lm-eval's simple_evaluate on the loaded model: {task: score} and their mean as `score`. A task whose data
    cannot be reached is one DatasetUnavailable line. `include_path`: a folder of extra task YAMLs (local tasks)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit or None,
                              task_manager=TaskManager(include_path=include_path or None))
    except (ConnectionError, OSError) as e:
        raise data.DatasetUnavailable(f"lm-eval tasks {list(tasks)} could not be loaded ({str(e).splitlines()[0]}); "
                                      f"they need the Hugging Face Hub or a copy in $HF_HOME") from None
    scores = {}
    for task, res in out["results"].items():
        key = next((k for k in _METRICS if k in res), None)
        if key is not None:
            scores[f"score_{task}"] = float(res[key])
    if not scores:
        raise RuntimeError(f"lm-eval returned no accuracy-like metric for {list(tasks)}: {out['results']}")
    scores["score"] = sum(scores.values()) / len(scores)
    return scores


def decode_paths(built: dict[str, tuple], how: str, max_len: int) -> tuple[dict[str, Any], dict[str, tuple]]:
    """What each precision is decoded through, and (path, why): `eager` — the model's forward, one token per call,
    every precision alike — or `static` — infer.FastDecode (static KV cache; compile + CUDA graph on GPU): float
    precisions as they are, int4 (GPTQ and RTN) with their own int4 weights read from the saved checkpoint into
    tinygemm's layout, int8 with torchao's integers through torch's int8 kernel (CPU only), and eager with the reason
    for what it cannot run (int8 on CUDA). The path is a column of Table 9: compare precisions on the same path."""
    from effllm_utils.engine.infer import FastDecode

    check_choices([how], DECODE_CHOICES, "decode")
    out, paths = {}, {}
    for p, (model, info) in built.items():
        out[p], paths[p] = model, ("eager", "")
        if how == "static":
            try:
                device = str(next(model.parameters()).device)
                if p.startswith("int4"):  # GPTQModel's checkpoint, read into tinygemm's layout
                    out[p] = FastDecode.from_gptq(info["path"], max_len, device)
                elif p == "int8":  # torchao's int8 weights, through torch's int8 kernel (CPU only)
                    if device != "cpu":
                        raise ValueError("the int8 decode kernel (_weight_int8pack_mm) runs on CPU only")
                    out[p] = FastDecode.from_int8(model, max_len, device)
                else:
                    out[p] = FastDecode(model, max_len)
                paths[p] = (out[p].path, "")
            except Exception as e:  # noqa: BLE001 - any refusal (shape, kernel, format): eager, noted
                paths[p] = ("eager", str(e))
    return out, paths
