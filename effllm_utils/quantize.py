"""The quantization study: fp32, fp16, bf16, int8 weight-only, int4 GPTQ and calibration-free int4 RTN
(paper Table 9, Figure 5).

Every precision is built from the same checkpoint, saved (safetensors) and reloaded — the reloaded model is what is
measured — and its bytes on disk and in memory are recorded. int8 is torchao's weight-only int8 through transformers'
`TorchAoConfig`; int4 goes through GPTQModel (AutoGPTQ's maintained successor, the backend of transformers'
GPTQConfig): `int4_gptq` with calibration on the training split, `int4_rtn` round-to-nearest with no calibration.
All precisions are measured side by side by `infer.measure` (interleaved), then each gets a record.

`tiny` quantizes the suite's own pretrained backbone: it is exported to `transformers`' Qwen2 format (weight-for-weight
identical, tested), which GPTQModel and torchao support. MCR follows the paper: nominal bits relative to bf16 times
performance retention, with perplexity as performance (retention = ppl_bf16 / ppl); `mcr_measured` uses bytes on disk.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from . import check_choices, data, metrics, outputs_dir, runs, telemetry
from .runtime import resolve_device, seed_everything

DECODE_CHOICES = ("eager", "static")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4_gptq", "int4_rtn")
NOMINAL_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4_gptq": 4, "int4_rtn": 4}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PrecisionUnsupported(RuntimeError):
    """A precision that cannot run, or runs incorrectly, on this device (e.g. fp16 overflow)."""


def to_qwen2(model):
    """An effllm backbone (mha/gqa/mqa + rope + dense) as a transformers Qwen2ForCausalLM with the same weights (zero
    q/k/v biases where the backbone has none), its logits checked against the backbone's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = model.config
    if c.attention not in ("mha", "gqa", "mqa") or c.position != "rope" or c.ffn != "dense":
        raise ValueError(f"only mha/gqa/mqa + rope + dense backbones export to Qwen2, not {c.attention}/{c.position}/"
                         f"{c.ffn}")
    ref = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)).eval()
    state = ref.state_dict()
    for k in state:
        state[k] = model.state_dict()[k] if k in model.state_dict() else torch.zeros_like(state[k])
    ref.load_state_dict(state)
    x = torch.arange(min(32, c.max_position_embeddings))[None] % c.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, model.eval()(x, use_cache=False).logits, atol=1e-4, rtol=1e-4)
    return ref


def export_qwen2(model, out_dir: Path, tok=None) -> Path:
    """Save an effllm backbone as a transformers Qwen2ForCausalLM checkpoint (see to_qwen2)."""
    ref = to_qwen2(model)
    ref.save_pretrained(out_dir)
    if tok is not None:
        tok.save_pretrained(out_dir)
    return out_dir


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


def build(precision: str, src: Path, tok, P: dict[str, Any], device: str, work: Path):
    """Quantize/cast the checkpoint at `src`, save it under work/<precision>, reload it: (model, info)."""
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
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
        from gptqmodel import GPTQModel, QuantizeConfig
        from gptqmodel.quantization.config import WeightOnlyConfig

        kw = {"weight_only": WeightOnlyConfig(method="rtn")} if precision == "int4_rtn" else {}
        qdev = "cpu" if device == "cpu" else device
        qm = GPTQModel.load(str(src), QuantizeConfig(bits=4, group_size=P["group_size"], **kw), device=qdev)
        calib = calibration_texts(tok, P["calibration_samples"], P["calibration_len"])
        qm.quantize(calib if precision == "int4_gptq" else None, batch_size=4)
        qm.save(str(out))
        model = GPTQModel.load(str(out), device=qdev).model
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


def base_checkpoint(profile: str, name: str, spec: dict[str, Any], P: dict[str, Any], device: str):
    """(checkpoint dir in Qwen2 format or Hub id, tokenizer): the suite's backbone (pretrained once, cached, shared
    with the fine-tuning study) exported to Qwen2, or a Hub model as it is."""
    from .finetune import load_base

    model, tok, info = load_base(profile, name, spec, P, "cpu")
    if spec["source"] != "suite":
        return spec["source"], tok
    out = Path(info["checkpoint"]).with_name(Path(info["checkpoint"]).name + "-qwen2")
    if not (out / "model.safetensors").is_file():
        with runs.atomic_dir(out) as tmp:
            export_qwen2(model, tmp, tok)
    return out, tok


def run_study(profile: str, P: dict[str, Any], force: bool = False) -> list[runs.RunRecord]:
    """Build every precision of every model, measure them side by side, store one record per precision."""
    from .finetune import check_model_specs
    from .infer import InferConfig, measure, perplexity

    check_choices(P["precisions"], PRECISIONS, "precision(s)")
    check_model_specs(P["models"])
    device = resolve_device(profile, P["device"])
    check_choices([P["decode"]], DECODE_CHOICES, "decode")
    records = []
    for name, spec in P["models"].items():
        keyed = {p: {k: v for k, v in P.items() if k != "precisions"} | {"model": spec, "device": device}
                 for p in P["precisions"]}
        pending = [p for p in P["precisions"]
                   if force or runs.ok_record(profile, "quantization", p, keyed[p], name) is None]
        results: dict[str, dict] = {}
        if pending:
            seed_everything(P["seed"])
            src, tok = base_checkpoint(profile, name, spec, P, device)
            work = outputs_dir(profile) / "checkpoints" / "quantization" / name
            built, errors = {}, {}
            for p in P["precisions"]:  # all of them: the measurement interleaves every precision
                try:
                    built[p] = build(p, src, tok, P, device, work)
                except Exception as e:  # noqa: BLE001 - recorded as this precision's failure, the rest go on
                    errors[p] = e
            val = data.token_ids("validation", tok) if spec["source"] == "suite" else None
            prompts = _prompts(tok, P, val)
            cfg = InferConfig(prompt_len=P["prompt_len"], new_tokens=P["new_tokens"], batch_sizes=P["batch_sizes"],
                              min_time_s=P["min_time_s"], min_requests=P["min_requests"])
            decoders, paths = decode_paths(built, P["decode"], P["prompt_len"] + P["new_tokens"] + 1)
            measured = measure(decoders, prompts, cfg, device, attribute_memory=True) if built else {}
            for p, (model, info) in built.items():
                ppl = perplexity(model, val, P["ppl_seq_len"], P["ppl_windows"], device) if val is not None else None
                scores = evaluate_tasks(model, tok, P["tasks"], P["task_limit"], P["task_include_path"]) \
                    if P["tasks"] else {}
                results[p] = {"metrics": {**{k: v for k, v in measured[p].items()
                                             if k not in ("energy_reason", "it_by_batch", "amu_method",
                                                          "latency_by_batch")},
                                          "disk_bytes": info["disk_bytes"], "memory_bytes": info["memory_bytes"],
                                          "nominal_bits": NOMINAL_BITS[p]},
                              "quality": {"ppl": ppl, **scores},
                              "artifacts": {"it_by_batch": measured[p]["it_by_batch"],
                                            "latency_by_batch": measured[p]["latency_by_batch"],
                                            "checkpoint": info["path"],
                                            "reload_max_abs_diff": info["reload_max_abs_diff"],
                                            "energy_reason": measured[p]["energy_reason"],
                                            "amu_method": measured[p]["amu_method"],
                                            "decode_path": paths[p][0], "decode_note": paths[p][1]}}
            _add_mcr(results)
            results.update({p: e for p, e in errors.items()})
        for p in P["precisions"]:
            def fn(p=p):
                r = results[p]
                if isinstance(r, Exception):
                    raise r
                return r
            records.append(runs.execute("quantization", p, profile, keyed[p], fn, scale=name, force=force))
    return records


def decode_paths(built: dict[str, tuple], how: str, max_len: int) -> tuple[dict[str, Any], dict[str, tuple]]:
    """What each precision is decoded through, and (path, why): `eager` — the model's forward, one token per call,
    every precision alike — or `static` — infer.FastDecode (static KV cache; compile + CUDA graph on GPU): float
    precisions as they are, int4 (GPTQ and RTN) with their own int4 weights read from the saved checkpoint into
    tinygemm's layout, and eager with the reason for what it cannot run (int8). The path is a column of Table 9:
    compare precisions on the same path."""
    from .infer import FastDecode

    check_choices([how], DECODE_CHOICES, "decode")
    out, paths = {}, {}
    for p, (model, info) in built.items():
        out[p], paths[p] = model, ("eager", "")
        if how == "static":
            try:
                if p.startswith("int4"):  # GPTQModel's checkpoint, read into tinygemm's layout
                    device = str(next(model.parameters()).device)
                    out[p] = FastDecode.from_gptq(info["path"], max_len, device)
                else:
                    out[p] = FastDecode(model, max_len)
                paths[p] = (out[p].path, "")
            except ValueError as e:
                paths[p] = ("eager", str(e))
    return out, paths


def _prompts(tok, P, val):
    n = max(P["batch_sizes"])
    if val is not None:
        starts = torch.linspace(0, len(val) - P["prompt_len"] - 1, n).long().tolist()
        return torch.stack([val[s:s + P["prompt_len"]] for s in starts])
    text = data.corpus_text("validation")  # Hub models: the embedded text, in their own tokenizer
    ids = torch.tensor(tok(text[:200_000])["input_ids"])
    starts = torch.linspace(0, len(ids) - P["prompt_len"] - 1, n).long().tolist()
    return torch.stack([ids[s:s + P["prompt_len"]] for s in starts])


def _add_mcr(results: dict[str, dict]) -> None:
    """MCR against bf16 (the paper's baseline), or fp32 where bf16 did not run. Performance is the mean lm-eval task
    score where tasks ran (as the paper), else 1/ppl."""
    base = "bf16" if "bf16" in results else "fp32" if "fp32" in results else None
    if base is None:
        return
    b = results[base]
    use_score = b["quality"].get("score") is not None
    if not use_score and b["quality"].get("ppl") is None:
        return
    for p, r in results.items():
        retention = r["quality"]["score"] / b["quality"]["score"] if use_score \
            else b["quality"]["ppl"] / r["quality"]["ppl"]
        r["artifacts"]["mcr_performance"] = "lm-eval score" if use_score else "1/ppl"
        r["metrics"]["mcr"] = metrics.mcr(retention, 1.0, NOMINAL_BITS[base], NOMINAL_BITS[p])
        r["metrics"]["mcr_measured"] = metrics.mcr_measured(b["metrics"]["disk_bytes"], r["metrics"]["disk_bytes"],
                                                            retention, 1.0)
        r["artifacts"]["mcr_baseline"] = base


# -- tables and figures (records only) ---------------------------------------------------------------------------

COLUMNS = {"scale": "model", "technique": "precision", "runs": "runs", "ppl": "PPL", "ppl_se": "PPL s.e.",
           "amu_gb": "AMU (GB)", "peak_mem_gb": "peak mem (GB)", "it": "IT (tokens/s)", "it_se": "IT s.e.",
           "al_s": "AL (s/request)", "prefill_s": "prefill (s)", "decode_token_p50_s": "decode p50 (s/token)",
           "decode_token_p90_s": "decode p90 (s/token)", "latency_batch": "latency at batch", "aec_w": "AEC (W)",
           "j_per_token": "J/token", "disk_bytes": "bytes on disk", "memory_bytes": "bytes in memory", "mcr": "MCR",
           "mcr_measured": "MCR (measured bytes)", "decode": "decode path"}


def table(profile: str):
    import pandas as pd

    recs = runs.load_summary(profile, "quantization")  # read once; repeats (other seeds) averaged
    if not recs:
        return pd.DataFrame(columns=list(COLUMNS.values()))
    order = {p: i for i, p in enumerate(PRECISIONS)}
    df = pd.DataFrame([row | {"decode": r.artifacts.get("decode_path", "eager")}
                       for r, row in zip(recs, runs.table_rows(recs, ("ppl", "it")))])
    df = df.sort_values(["scale", "technique"], key=lambda s: s.map(order) if s.name == "technique" else s)
    return df[[c for c in COLUMNS if c in df]].rename(columns=COLUMNS).reset_index(drop=True)


def figures(profile: str, study: str = "quantization") -> list:
    """Table 9 (CSV/MD/TeX) and, per model, Figure 5: latency, throughput and memory per precision, and the
    quality-vs-size trade-off."""
    import matplotlib.pyplot as plt

    from . import plotting
    from .pretrain import write_table

    t = table(profile)
    if t.empty:
        return []
    paths = write_table(t, profile, "quantization")
    plotting.use_style()
    for model, sub in t.groupby("model", sort=False):
        ps = list(sub["precision"])
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), layout="constrained")
        batch = sub["latency at batch"].dropna().unique() if "latency at batch" in sub else []
        plotting.bar(axes[0], ps, list(sub["AL (s/request)"]),
                     f"AL (s/request, batch {int(batch[0])})" if len(batch) == 1 else "AL (s/request)")
        se = {c: list(sub[c].astype(float)) if c in sub else None for c in ("IT s.e.", "PPL s.e.")}  # repeats
        plotting.bar(axes[1], ps, list(sub["IT (tokens/s)"]), "IT (tokens/s)", value_fmt="{:.0f}",
                     errors=se["IT s.e."])
        plotting.bar(axes[2], ps, list(sub["bytes on disk"] / 1e6), "MB on disk", value_fmt="{:.2f}")
        plotting.pareto(axes[3], ps, list(sub["bytes on disk"] / 1e6), list(sub["PPL"]), "MB on disk", "PPL",
                        y_errors=se["PPL s.e."])
        fig.suptitle(f"quantization — {model}", fontsize=10)
        paths += plotting.savefig(fig, f"quantization_{model}", profile)
        plt.close(fig)
    return paths
