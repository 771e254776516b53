"""Architecture pretraining studies (attention, positional_encoding, moe, attention_free, depth_width).

All five share one shape: for every scale and technique, build a model, pretrain it with `train.train` under
telemetry, store a record; then draw the paper's table and a radar chart from the records. A technique is a name
and a dict of backbone config overrides, e.g. `{"mla": {"attention": "mla"}}`; two special keys:
  baseline: "mamba" | "rwkv" | "pythia"   a transformers model matched to the backbone's parameter count; the
                                          technique's other keys are fields of that model's config
                                          (`{"baseline": "pythia", "use_parallel_residual": false}`)
  match_params: true                      re-solve hidden_size so the total parameter count matches the scale's
                                          base config (the depth/width study varies depth at fixed size)
Every key is checked against the config it sets before the first run trains (`check_specs`): a misspelt key is an
error naming the closest valid one, not a silently default model.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import data, hardware, metrics, outputs_dir, runs
from .runtime import resolve_device, seed_everything

TRAIN_KEYS = ("steps", "batch_size", "grad_accum", "seq_len", "lr", "warmup_steps", "eval_every", "eval_batches",
              "precision", "compile", "seed")
SPECIAL_KEYS = ("baseline", "match_params")
RADAR_METRICS = ("ppl", "amu_gb", "al_s", "tt", "aec_w", "pcu")
TABLE_COLUMNS = {  # record column -> table header (units in the header, as in the paper's tables)
    "technique": "technique", "scale": "scale", "runs": "runs", "params": "params", "ppl": "PPL", "ppl_se": "PPL s.e.",
    "amu_gb": "AMU (GB)", "al_s": "AL (s/iter)", "tt": "TT (tokens/param/s)", "tokens_per_s": "tokens/s",
    "aec_w": "AEC (W)", "pcu": "PCU", "mfu_pct": "MFU (%)", "flops_per_token": "FLOPs/token",
    "kv_bytes_per_token": "KV bytes/token",
}


# -- data --------------------------------------------------------------------------------------------------------

def tokenizer_for(P: dict[str, Any]):
    """The embedded-corpus BPE (`tokenizer: embedded`) or a Hub tokenizer by name."""
    if P["tokenizer"] == "embedded":
        return data.tokenizer(P["vocab_size"])
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(P["tokenizer"])
    except OSError as e:
        raise data.DatasetUnavailable(f"tokenizer {P['tokenizer']!r} could not be loaded ({str(e).splitlines()[0]}); "
                                      f"it needs the Hugging Face Hub or a local copy in $HF_HOME") from None


def token_data(P: dict[str, Any], tok):
    """(train_ids, val_ids): the embedded corpus, or `train_tokens` of a Hub dataset (validation: the next 5%),
    memory-mapped from the token cache (`data_files`: a local copy of the dataset instead of the Hub)."""
    if P["dataset"] == "embedded":
        return data.token_ids("train", tok), data.token_ids("validation", tok)
    # tokenized once into a memory-mapped int32 file (data.hub_token_ids); the splits are views of it
    ids = data.hub_token_ids(P["dataset"], tok, int(P["train_tokens"] * 1.05), data_files=P.get("data_files") or None)
    cut = int(len(ids) / 1.05)
    return ids[:cut], ids[cut:]


# -- models ------------------------------------------------------------------------------------------------------

def _base_config(scale_dims: dict[str, Any], vocab_size: int, overrides: dict[str, Any]):
    from . import models

    fields = {"vocab_size": vocab_size} | scale_dims | overrides
    models.config_fields_check(fields)
    return models.EffLLMConfig(**fields)


def check_specs(P: dict[str, Any]) -> None:
    """Every scale and technique of a study's params names real config fields and values, checked before the first
    run trains: a typo in the last technique would otherwise fail (or, unchecked, train the default) hours in."""
    from . import models
    from .models.baselines import check_overrides

    for scale, dims in P["scales"].items():
        models.config_fields_check(dims, f"scales[{scale!r}]")
        for technique, spec in P["techniques"].items():
            spec = dict(spec)
            where, matched = f"techniques[{technique!r}]", spec.pop("match_params", False)
            if "baseline" in spec:
                if matched:
                    raise ValueError(f"{where}: match_params does not apply to a baseline (its width is always "
                                     f"matched to the backbone's parameter count); remove it")
                check_overrides(spec.pop("baseline"), spec, where)
                continue
            models.config_fields_check(spec, where)
            if matched:  # the width is solved per run; the spec's values are checked at that width
                continue
            try:
                _base_config(dims, P.get("vocab_size", 4096), spec)
            except ValueError as e:
                raise ValueError(f"{where} at scale {scale!r}: {e}") from None


def non_embedding_params(cfg) -> int:
    """Parameters outside the token embedding and the LM head (Kaplan et al.'s N), counted without allocating."""
    import torch

    from .models import EffLLMForCausalLM

    with torch.device("meta"):
        model = EffLLMForCausalLM(cfg)
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def match_hidden_size(scale_dims: dict[str, Any], vocab_size: int, overrides: dict[str, Any], multiple: int = 8):
    """Overrides with hidden_size (and intermediate_size in the scale's ratio) solved so the non-embedding parameter
    count is the closest to the scale's base config: depth changes, size does not. Non-embedding, because at small
    scales the embedding dominates the total and would hide the trade-off."""
    target = non_embedding_params(_base_config(scale_dims, vocab_size, {}))
    ratio = scale_dims.get("intermediate_size", 688) / scale_dims.get("hidden_size", 256)
    heads = overrides.get("num_attention_heads", scale_dims.get("num_attention_heads", 4))
    step = math.lcm(multiple, heads * 2)

    def with_width(h: int) -> dict[str, Any]:
        return overrides | {"hidden_size": h, "intermediate_size": int(round(h * ratio / 8)) * 8}

    return with_width(min(range(step, 64 * step + 1, step), key=lambda h: abs(
        non_embedding_params(_base_config(scale_dims, vocab_size, with_width(h))) - target)))


def build_model(scale_dims: dict[str, Any], vocab_size: int, spec: dict[str, Any], context: int):
    """(model, flops_per_token or None, kv_bytes_per_token or None) for one technique spec."""
    from . import models
    from .models.baselines import build_baseline

    spec = dict(spec)
    family = spec.pop("baseline", None)
    if family is not None:
        backbone = models.EffLLMForCausalLM(_base_config(scale_dims, vocab_size, {}))
        n_layers = scale_dims.get("num_hidden_layers", backbone.config.num_hidden_layers)
        model = build_baseline(family, backbone.num_parameters(), n_layers, vocab_size, context, overrides=spec)
        return model, None, None
    if spec.pop("match_params", False):
        spec = match_hidden_size(scale_dims, vocab_size, spec)
    cfg = _base_config(scale_dims, vocab_size, spec)
    model = models.EffLLMForCausalLM(cfg)
    shape = cfg.shape()
    return model, metrics.training_flops_per_token(shape, context), metrics.kv_bytes_per_token(shape, 2)


def device_peak(profile: str, device: str, precision: str) -> tuple[float | None, str]:
    """Peak FLOP/s for PCU: the datasheet, else the hardware study's measured peak, else None with the reason."""
    name = runs.device_name()
    dtype = "bf16" if precision == "bf16" or (precision == "auto" and device.startswith("cuda")) else "fp32"
    try:
        return metrics.peak_flops(name, dtype, measured=hardware.measured_peaks(profile, name))
    except ValueError as e:
        return None, str(e)


# -- one study ---------------------------------------------------------------------------------------------------

def run_study(study: str, profile: str, P: dict[str, Any], force: bool = False) -> list[runs.RunRecord]:
    """Pretrain every (scale, technique) of a study and store one record each (existing ones are skipped)."""
    from .train import TrainConfig, train

    check_specs(P)
    device = resolve_device(profile, P["device"])
    records = []
    for scale, dims in P["scales"].items():
        for technique, spec in P["techniques"].items():
            run_params = {k: P[k] for k in (*TRAIN_KEYS, "vocab_size", "dataset", "tokenizer", "train_tokens")
                          if k in P} | {"dims": dims, "spec": spec, "device": device} | (
                {"data_files": P["data_files"]} if P.get("data_files") else {})  # a local copy is other data

            def fn(dims=dims, spec=spec, technique=technique, scale=scale):
                seed_everything(P["seed"])
                tok = tokenizer_for(P)
                train_ids, val_ids = token_data(P, tok)
                model, fpt, kv = build_model(dims, len(tok), spec, P["seq_len"])
                peak, peak_source = device_peak(profile, device, P["precision"])
                ckpt = outputs_dir(profile) / "checkpoints" / study / f"{scale}-{technique}"
                cfg = TrainConfig(**{k: P[k] for k in TRAIN_KEYS})
                result = train(model.to(device), train_ids, val_ids, cfg, flops_per_token=fpt, peak_flops=peak,
                               checkpoint_dir=ckpt if P["save_checkpoints"] else None)
                result["metrics"]["kv_bytes_per_token"] = kv
                result["artifacts"]["peak_flops_source"] = peak_source
                result["artifacts"]["flops_per_token_source"] = "analytic (effllm_utils.metrics)" if fpt \
                    else "6 x parameters (transformers baseline)"
                result["artifacts"]["model_config"] = model.config.to_dict()
                if spec.get("baseline") == "mamba":  # which selective scan the measured speed is of
                    from .models.mamba_scan import scan_in_use

                    result["artifacts"]["selective_scan"] = scan_in_use(device)
                return result

            records.append(runs.execute(study, technique, profile, run_params, fn, scale=scale, force=force))
    return records


# -- tables and figures (from records only) -----------------------------------------------------------------------

def table(profile: str, study: str, records: list | None = None):
    """The study's table as a DataFrame, one row per experiment (`runs.load_summary`, or `records` already
    summarised), paper-style headers; with repeats (other seeds) the values are means and `runs` and `PPL s.e.`
    say over how many and how far apart."""
    import pandas as pd

    recs = runs.load_summary(profile, study) if records is None else records
    if not recs:
        return pd.DataFrame(columns=list(TABLE_COLUMNS.values()))
    df = pd.DataFrame(runs.table_rows(recs, ("ppl",)))
    cols = [c for c in TABLE_COLUMNS if c in df]
    return df[cols].rename(columns=TABLE_COLUMNS).sort_values(["scale", "technique"]).reset_index(drop=True)


def write_table(df, profile: str, name: str) -> list[Path]:
    """CSV, Markdown and LaTeX under outputs/<profile>/tables/, written atomically. Markdown cells escape `|` (a
    claim's evidence joins metrics with it) and LaTeX escapes `_`, `%`, `&` ... (technique names, "MFU (%)"), so both
    render as tables; a value not measured is blank in Markdown and -- in LaTeX."""
    import pandas as pd

    out = outputs_dir(profile) / "tables"
    paths = [out / f"{name}.csv", out / f"{name}.md", out / f"{name}.tex"]

    def pipe(v):
        return v.replace("|", r"\|") if isinstance(v, str) else v

    md = df.map(pipe).rename(columns=pipe).astype(object)
    md = md.where(md.map(lambda v: not (v is None or (isinstance(v, float) and pd.isna(v)))), None)
    runs.atomic_write_text(paths[0], df.to_csv(index=False))
    runs.atomic_write_text(paths[1], md.to_markdown(index=False, floatfmt=".4g", missingval="") + "\n")
    runs.atomic_write_text(paths[2], df.to_latex(index=False, float_format="%.4g", escape=True, na_rep="--"))
    return paths


def figures(profile: str, study: str) -> list[Path]:
    """Table (CSV/MD/TeX), a radar chart per scale over the six metrics, and the loss curves."""
    import matplotlib.pyplot as plt
    import numpy as np

    from . import plotting

    recs = runs.load_summary(profile, study)
    if not recs:
        return []
    paths = write_table(table(profile, study, recs), profile, study)
    plotting.use_style()
    for scale in sorted({r.scale for r in recs}):
        rs = [r for r in recs if r.scale == scale]
        rows = {r.technique: {**r.metrics, **r.quality} for r in rs}
        keys = [k for k in RADAR_METRICS if all(rows[t].get(k) is not None for t in rows)]
        left_out = [plotting.METRIC_LABELS.get(k, k) for k in RADAR_METRICS if k not in keys]
        fig = plt.figure(figsize=(10, 4), layout="constrained")
        ax = fig.add_subplot(1, 2, 1, projection="polar")
        plotting.radar(ax, rows, keys)
        ax.set_title(f"{study} — {scale} (1 = best)" + (f"\nnot measured here: {', '.join(left_out)}"
                                                       if left_out else ""), fontsize=9)
        ax2 = fig.add_subplot(1, 2, 2)
        for r in rs:
            curve, n = r.artifacts["loss_curve"], runs.n_runs(r)
            label = f"{r.technique} (val ppl {r.quality['ppl']:.1f}" + (f", mean of {n} runs)" if n > 1 else ")")
            ax2.plot(np.arange(1, len(curve) + 1), curve, color=plotting.technique_color(r.technique), label=label)
        ax2.set(xlabel="step", ylabel="train loss (nats/token)", title="loss curves")
        ax2.legend(fontsize=7)
        paths += plotting.savefig(fig, f"{study}_{scale}", profile)
        plt.close(fig)
    return paths
