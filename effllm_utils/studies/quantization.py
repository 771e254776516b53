"""The quantization study: each model at every precision, held-out perplexity (and lm-eval tasks where reachable),
memory, latency and throughput from the inference harness, MCR against the bf16 (or fp32) row.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from effllm_utils import check_choices, data, outputs_dir
from effllm_utils.core import progress, runs
from effllm_utils.core.provenance import HostLoad, environment
from effllm_utils.core.runtime import release_memory, resolve_device, seed_everything
from effllm_utils.engine.quantize import (
    DECODE_CHOICES,
    NOMINAL_BITS,
    PRECISIONS,
    build,
    calibration_texts,
    decode_paths,
    evaluate_tasks,
)
from effllm_utils.engine.suite import base_checkpoint, check_model_specs
from effllm_utils.measure import metrics
from effllm_utils.models.hub import ModelUnavailable


def run_study(study: str, profile: str, P: dict[str, Any], force: bool = False) -> list[runs.RunRecord]:
    """Build every precision of every model, measure them side by side, store one record per precision."""
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
        t0, load = time.perf_counter(), HostLoad()
        with load:  # the precisions are measured together, before their records are written
            results = _measure_model(name, spec, profile, P, device) if pending else {}
        # each record: the load beside the measurement and an equal share of its time among the precisions measured
        # (a retry of one failed precision measures them all again, side by side, and records one)
        made = {"environment": environment() | {"host_other_cpu_frac": load.other_cpu_frac},
                "duration_s": (time.perf_counter() - t0) / len(results)} if results else {}
        for p in P["precisions"]:
            def fn(p=p, results=results, made=made):  # called here, in this model's turn
                r = results[p]
                if isinstance(r, Exception):
                    raise r
                return r | made
            records.append(runs.execute("quantization", p, profile, keyed[p], fn, scale=name, force=force))
    return records


def _measure_model(name: str, spec, profile: str, P: dict[str, Any], device: str) -> dict:
    """{precision: result or error} of one model's precisions, measured side by side."""
    seed_everything(P["seed"])
    try:
        src, tok, base_info = base_checkpoint(profile, name, spec, P, device)
    except ModelUnavailable as e:  # this model cannot be had: its records say why, the other models go on
        return {p: e for p in P["precisions"]}
    work = outputs_dir(profile) / "checkpoints" / "quantization" / name
    calib, calib_source = calibration(tok, P)
    val = data.token_ids("validation", tok)  # the shipped held-out text, in the model's own tokenizer
    # every precision resident and measured interleaved (drift hits all alike), or one at a time, each freed before
    # the next is built (models that do not fit several times over)
    groups = [[p] for p in P["precisions"]] if P.get("one_at_a_time", False) else [list(P["precisions"])]
    results: dict[str, Any] = {}
    for group in groups:
        results |= _measure(group, src, tok, P, device, work, calib, val, base_info | {"calibration": calib_source})
        release_memory()
    _add_mcr({p: r for p, r in results.items() if not isinstance(r, Exception)})
    return results


def calibration(tok, P) -> tuple[list[str], str]:
    """GPTQ's calibration windows and where they come from: `calibration_data` (a Hub dataset key such as
    fineweb_edu: in-distribution text for Hub models) or the shipped training split; a dataset that cannot be
    reached falls back to the shipped text, and the records say so."""
    n, length = P["calibration_samples"], P["calibration_len"]
    if P.get("calibration_data", "embedded") == "embedded":
        return calibration_texts(tok, n, length), "embedded training split (Shakespeare/Milton)"
    try:
        ids = data.hub_token_ids(P["calibration_data"], tok, n * length)
    except (data.DatasetUnavailable, OSError, ConnectionError) as e:
        why = str(e).splitlines()[0][:200]
        return calibration_texts(tok, n, length), (f"embedded training split ({P['calibration_data']} unreachable: "
                                                   f"{why})")
    return ([tok.decode(ids[i * length:(i + 1) * length]) for i in range(n)],
            f"{P['calibration_data']} (first {n} x {length} tokens)")


def _measure(group: list[str], src, tok, P, device: str, work, calib: list[str], val: torch.Tensor,
             base_info: dict) -> dict:
    """Build the precisions of `group` (all resident), measure them side by side on the held-out ids `val`:
    {precision: result or error}."""
    from effllm_utils.engine.infer import InferConfig, measure, perplexity

    built, out = {}, {}
    for i, p in enumerate(group, 1):
        progress.stage(f"{work.name}: building {p} ({'GPTQ calibration, ' if p == 'int4_gptq' else ''}saved and "
                       "reloaded)", i, len(group))
        try:
            built[p] = build(p, src, tok, P, device, work, calib)
        except Exception as e:  # noqa: BLE001 - recorded as this precision's failure, the rest go on
            out[p] = e
    cfg = InferConfig(prompt_len=P["prompt_len"], new_tokens=P["new_tokens"], batch_sizes=P["batch_sizes"],
                      min_time_s=P["min_time_s"], min_requests=P["min_requests"])
    decoders, paths = decode_paths(built, P["decode"], P["prompt_len"] + P["new_tokens"] + 1)
    progress.stage(f"{work.name}: decoding {', '.join(built)} side by side", 1, 1)
    measured = measure(decoders, _prompts(P, val), cfg, device, attribute_memory=True) if built else {}
    for i, (p, (model, info)) in enumerate(built.items(), 1):
        progress.stage(f"{work.name} {p}: perplexity" + (" and lm-eval tasks" if P["tasks"] else ""), i, len(built))
        ppl = perplexity(model, val, P["ppl_seq_len"], P["ppl_windows"], device)
        scores = evaluate_tasks(model, tok, P["tasks"], P["task_limit"], P["task_include_path"]) if P["tasks"] else {}
        m = measured[p]
        out[p] = {"metrics": {**{k: v for k, v in m.items() if k not in _ARTIFACT_KEYS},
                              "disk_bytes": info["disk_bytes"], "memory_bytes": info["memory_bytes"],
                              "nominal_bits": NOMINAL_BITS[p]},
                  "quality": {"ppl": ppl, **scores},
                  "artifacts": {**{k: m[k] for k in _ARTIFACT_KEYS}, "checkpoint": info["path"], "base": base_info,
                                "reload_max_abs_diff": info["reload_max_abs_diff"], "decode_path": paths[p][0],
                                "decode_note": paths[p][1], "resident": "one at a time" if P.get("one_at_a_time", False)
                                else "all precisions, interleaved"}}
    return out


_ARTIFACT_KEYS = ("energy_reason", "it_by_batch", "amu_method", "latency_by_batch")


def _prompts(P, val: torch.Tensor) -> torch.Tensor:
    """max(batch_sizes) prompts of prompt_len tokens, evenly spaced over the held-out text."""
    starts = torch.linspace(0, len(val) - P["prompt_len"] - 1, max(P["batch_sizes"])).long().tolist()
    return torch.stack([val[s:s + P["prompt_len"]] for s in starts])


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
