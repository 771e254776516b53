"""Each study's tables and figures, drawn from records only (never from study code): the functions the study registry
names. One module, one section per study family; under 400 lines as long as each section stays small.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from effllm_utils import outputs_dir
from effllm_utils.core import aggregate, runs
from effllm_utils.engine.adapters import METHODS, method_lr
from effllm_utils.engine.quantize import PRECISIONS
from effllm_utils.engine.sweep import is_sweep_point
from effllm_utils.measure import metrics
from effllm_utils.report.tables import write_table
from effllm_utils.studies import registry

RADAR_METRICS = ("ppl", "amu_gb", "al_s", "tt", "aec_w", "pcu")


def columns(keys: tuple[str, ...], per: dict[str, str] | None = None, **names: str) -> dict[str, str]:
    """Record column -> table header for `keys`: a metric's header from `metrics.METRICS` (name and unit, `per`
    qualifying a unit: {"al_s": "iter"} gives "AL (s/iter)"), `names` for the table's own words (technique="method";
    a renamed metric's derived columns follow it: loss="eval loss" gives "eval loss s.e." for loss_se), the
    structural columns as `STRUCTURE` says."""
    per = per or {}

    def head(k: str) -> str:
        if k in names or k in STRUCTURE:
            return names.get(k) or STRUCTURE[k]
        for suffix, words in metrics.DERIVED.items():  # a renamed metric's derived columns follow its name
            if k.endswith(suffix) and k.removesuffix(suffix) in names:
                return f"{names[k.removesuffix(suffix)]} {words}"
        return metrics.header(k, per.get(k))

    return {k: head(k) for k in keys}


STRUCTURE = {"technique": "technique", "scale": "scale", "runs": "runs", "param.dataset": "dataset", "task": "task",
             "latency_batch": "latency at batch", "decode": "decode path", "param.lr": "LR"}
RADAR_METRICS = ("ppl", "amu_gb", "al_s", "tt", "aec_w", "pcu")
PRETRAIN_COLUMNS = columns(("technique", "scale", "param.lr", "runs", "params", "tokens_seen", "tokens_per_param",
                            "ppl", "ppl_se", "amu_gb", "al_s", "tt",
                            "tokens_per_s", "aec_w", "j_per_token", "pcu", "mfu_pct", "flops_per_token",
                            "kv_bytes_per_token"),
                           per={"al_s": "iter"})


# -- tables and figures (from records only) -----------------------------------------------------------------------

def figures(profile: str, study: str) -> list[Path]:
    """A study's tables and figures (its registry `figures` view), drawn again only when what they are drawn from
    changed: the study's record files, the package's code, the plotting libraries or the paper-figure setting. `make
    reproduce` draws each study in its own notebook and all of them again in paper_figures, where this makes the
    second drawing a lookup. The manifest: outputs/<profile>/figures/.drawn/<study>.json."""
    import hashlib
    import json
    from importlib import metadata

    from effllm_utils.report import plots as plotting

    h = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]  # the views read aggregate, metrics, sweep, ...: all of it counts
    for f in [*sorted(runs.runs_dir(profile, study).glob("*.json")), *sorted(package.rglob("*.py"))]:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(f"{metadata.version('matplotlib')}:{metadata.version('seaborn')}:"
             f"{os.environ.get(plotting.PAPER_ENV, '')}".encode())
    stamp = h.hexdigest()
    manifest = outputs_dir(profile) / "figures" / ".drawn" / f"{study}.json"
    try:
        seen = json.loads(manifest.read_text())
        if seen["stamp"] == stamp and all(Path(p).is_file() for p in seen["paths"]):
            return [Path(p) for p in seen["paths"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    paths = registry.resolve(registry.get(study).figures, "report")(profile, study)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(manifest, json.dumps({"stamp": stamp, "paths": [str(p) for p in paths]}))
    return paths


def pretraining_table(profile: str, study: str, records: list | None = None):
    """The study's table as a DataFrame, one row per experiment (`aggregate.load_summary`, or `records` already
    summarised), paper-style headers; with repeats (other seeds) the values are means and `runs` and `PPL s.e.`
    say over how many and how far apart."""
    import pandas as pd

    recs = registry.summary(profile, study, sweep_points=True) if records is None else records
    if not recs:
        return pd.DataFrame(columns=list(PRETRAIN_COLUMNS.values()))
    df = pd.DataFrame(aggregate.table_rows(recs, ("ppl",)))
    cols = [c for c in PRETRAIN_COLUMNS if c in df]
    return df[cols].rename(columns=PRETRAIN_COLUMNS).sort_values(["scale", "technique"]).reset_index(drop=True)


def budget(recs) -> str:
    """The training budget of a figure's runs for its title: "\n0.0819M tokens (0.046 tokens/param)" (the largest
    budget and the smallest ratio where the runs differ), or "" for records without one."""
    seen = [r.metrics.get("tokens_seen") for r in recs]
    ratio = [r.metrics.get("tokens_per_param") for r in recs]
    if any(v is None for v in seen + ratio):
        return ""
    return f"\n{max(seen) / 1e6:.3g}M tokens ({min(ratio):.2g} tokens/param)"


def pretraining_figures(profile: str, study: str) -> list[Path]:
    """Table (CSV/MD/TeX), a radar chart per scale over the six metrics, and the loss curves."""
    import matplotlib.pyplot as plt

    from effllm_utils.report import plots as plotting

    recs = registry.summary(profile, study)
    if not recs:
        return []
    paths = write_table(pretraining_table(profile, study), profile, study)  # with any LR sweep's points
    plotting.use_style()
    for scale in sorted({r.scale for r in recs}):
        rs = [r for r in recs if r.scale == scale]
        rows = {r.technique: {**r.metrics, **r.quality} for r in rs}
        keys = [k for k in RADAR_METRICS if all(rows[t].get(k) is not None for t in rows)]
        left_out = [metrics.METRICS[k].name for k in RADAR_METRICS if k not in keys]
        fig = plt.figure(figsize=(14, 4), layout="constrained")
        ax = fig.add_subplot(1, 3, 1, projection="polar")
        plotting.radar(ax, rows, keys)
        ax.set_title(f"{study} — {scale} (1 = best){budget(rs)}" + (f"\nnot measured here: {', '.join(left_out)}"
                                                                  if left_out else ""), fontsize=9)
        runs_ = [r for r in registry.current(profile, study) if r.scale == scale and not is_sweep_point(r)]
        seeds = max((aggregate.n_runs(r) for r in rs), default=1)
        ax2 = fig.add_subplot(1, 3, 2)  # every seed's curve, the band over seeds (seaborn)
        plotting.seed_bands(ax2, runs_, "train loss (nats/token)")
        ax2.set_title(f"loss curves ({seeds} seed{'s' * (seeds > 1)}; band: 95% CI over seeds)")
        ax3 = fig.add_subplot(1, 3, 3)
        plotting.bars_with_ci(ax3, runs_, "ppl", metrics.header("ppl"))
        ax3.set_title("validation perplexity (mean, 95% CI over seeds)")
        paths += plotting.savefig(fig, f"{study}_{scale}", profile)
        plt.close(fig)
    return paths


# -- tables and figures (records only) ---------------------------------------------------------------------------

FT_NAMES = {"scale": "model", "technique": "method", "loss": "eval loss"}  # the fine-tuning tables' words
PEFT_COLUMNS = columns(("scale", "param.dataset", "technique", "param.lr", "runs", "train_loss", "loss", "loss_se",
                        "trainable_params", "amu_gb", "peak_mem_gb", "pcu", "al_s", "st", "aec_w", "j_per_token",
                        "energy_j", "efficiency_score"), per={"al_s": "iter"}, **FT_NAMES)
# table column -> record key for the fine-tuning radar charts (peft and vlm)
RADAR_COLUMNS = {PEFT_COLUMNS[k]: k for k in ("loss", "amu_gb", "al_s", "st", "aec_w", "pcu")}
SCORE_KEYS = ("amu_gb", "pcu", "al_s", "st", "aec_w")


def with_efficiency_score(df, by: list[str] | str):
    """`df` (one row per record, record keys as columns) with `efficiency_score` computed within each group of `by`
    over SCORE_KEYS (`metrics.efficiency_score`; a key no record holds counts as not measured). The peft, vlm and
    lvm fine-tuning tables."""
    df = df.reindex(columns=list(dict.fromkeys([*df.columns, *SCORE_KEYS])))
    df["efficiency_score"] = float("nan")
    for _, idx in df.groupby(by).groups.items():
        sub = df.loc[idx]
        df.loc[idx, "efficiency_score"] = metrics.efficiency_score({k: sub[k].astype(float) for k in SCORE_KEYS})
    return df


def peft_table(profile: str, sweep_points: bool = True):
    """Tables 7-8 layout: one row per (model, dataset, method) with the LR it trained at and the efficiency score
    computed within each (model, dataset) group over the metrics measured there (metrics.efficiency_score); the
    points of LR sweeps (model "<model> lr=<value>") listed too where `sweep_points`, without a score (the score
    compares methods at their best LRs)."""
    import pandas as pd

    recs = registry.summary(profile, "peft", sweep_points=sweep_points)  # repeats (other seeds) averaged
    if not recs:
        return pd.DataFrame(columns=list(PEFT_COLUMNS.values()))
    df = pd.DataFrame(aggregate.table_rows(recs, ("loss",)))
    df["param.dataset"] = df["param.dataset"].astype(str)
    df["param.lr"] = [r.params.get(method_lr(r.technique, "lr_full", "lr_adapter")) for r in recs]
    swept = np.array([is_sweep_point(r) for r in recs])
    df = pd.concat([with_efficiency_score(df[~swept], ["scale", "param.dataset"]), df[swept]]).sort_index()
    order = {m: i for i, m in enumerate(METHODS)}
    df = df.sort_values(["scale", "param.dataset", "technique"], key=lambda s: s.map(order) if s.name == "technique"
                        else s)
    return df[[c for c in PEFT_COLUMNS if c in df]].rename(columns=PEFT_COLUMNS).reset_index(drop=True)


def half_widths(table, se_column: str) -> list | None:
    """Each row's 95% t-interval half-width from a table's `runs` and `se_column` (None where a row is one run; the
    whole column None for a table without repeats)."""
    from effllm_utils.report import plots as plotting

    if se_column not in table or "runs" not in table:
        return None
    return [plotting.t_half(float(se), int(n)) if se is not None and math.isfinite(se) and math.isfinite(n)
            else None
            for se, n in zip(table[se_column], table["runs"])]


def peft_figures(profile: str, study: str = "peft") -> list:
    """Table (CSV/MD/TeX); per (model, dataset): efficiency-score bars (Figure 4), a radar, and a Pareto plot of
    eval loss against energy (or against latency where energy is not measurable, which the axis says)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from effllm_utils.report import plots as plotting
    from effllm_utils.report.tables import write_table

    table = peft_table(profile)  # with any LR sweep's points
    if table.empty:
        return []
    paths = write_table(table, profile, "peft")
    t = peft_table(profile, sweep_points=False)  # the figures compare each method at its best LR
    if t.empty:
        return paths
    plotting.use_style()
    for (model, dataset), sub in t.groupby(["model", "dataset"], sort=False):
        methods = list(sub["method"])
        fig = plt.figure(figsize=(13, 3.8), layout="constrained")
        ax1 = fig.add_subplot(1, 3, 1)
        plotting.bar(ax1, methods, list(sub["efficiency score"]), "efficiency score (1 = best)", value_fmt="{:.2f}")
        ax1.set_title(f"{model} / {dataset}")
        ax2 = fig.add_subplot(1, 3, 2, projection="polar")
        keys = RADAR_COLUMNS
        rows = {m: {keys[c]: float(r[c]) for c in keys if c in sub and pd.notna(r[c])} for m, (_, r) in
                zip(methods, sub.iterrows())}
        present = [k for k in keys.values() if all(k in rows[m] for m in methods)]
        plotting.radar(ax2, rows, present)
        ax3 = fig.add_subplot(1, 3, 3)
        E, L, AL = PEFT_COLUMNS["energy_j"], PEFT_COLUMNS["loss"], PEFT_COLUMNS["al_s"]
        energy = sub[E] if E in sub else None
        loss_ci = half_widths(sub, PEFT_COLUMNS["loss_se"])
        if energy is not None and energy.notna().all():
            plotting.pareto(ax3, methods, list(energy), list(sub[L]), E, L, y_errors=loss_ci)
        else:
            plotting.pareto(ax3, methods, list(sub[AL]), list(sub[L]), f"{AL} — energy not measurable on this device",
                            L, y_errors=loss_ci)
        paths += plotting.savefig(fig, f"peft_{model}_{dataset}", profile)
        plt.close(fig)
    return paths


# -- tables and figures (records only) ---------------------------------------------------------------------------

QUANT_COLUMNS = columns(("scale", "technique", "runs", "ppl", "ppl_se", "amu_gb", "peak_mem_gb", "it", "it_se",
                         "al_s", "prefill_s", "decode_token_p50_s", "decode_token_p90_s", "latency_batch", "aec_w",
                         "j_per_token", "disk_bytes", "memory_bytes", "mcr", "mcr_measured", "decode"),
                        per={"al_s": "request"}, scale="model", technique="precision")


def quantization_table(profile: str):
    import pandas as pd

    recs = registry.summary(profile, "quantization")  # read once; repeats (other seeds) averaged
    if not recs:
        return pd.DataFrame(columns=list(QUANT_COLUMNS.values()))
    order = {p: i for i, p in enumerate(PRECISIONS)}
    df = pd.DataFrame([row | {"decode": r.artifacts.get("decode_path", "eager")}
                       for r, row in zip(recs, aggregate.table_rows(recs, ("ppl", "it")))])
    df = df.sort_values(["scale", "technique"], key=lambda s: s.map(order) if s.name == "technique" else s)
    return df[[c for c in QUANT_COLUMNS if c in df]].rename(columns=QUANT_COLUMNS).reset_index(drop=True)


def quantization_figures(profile: str, study: str = "quantization") -> list:
    """Table 9 (CSV/MD/TeX) and, per model, Figure 5: latency, throughput and memory per precision, and the
    quality-vs-size trade-off."""
    import matplotlib.pyplot as plt

    from effllm_utils.report import plots as plotting
    from effllm_utils.report.tables import write_table

    t = quantization_table(profile)
    if t.empty:
        return []
    paths = write_table(t, profile, "quantization")
    plotting.use_style()
    for model, sub in t.groupby(QUANT_COLUMNS["scale"], sort=False):
        C = QUANT_COLUMNS
        ps = list(sub[C["technique"]])
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), layout="constrained")
        batch = sub[C["latency_batch"]].dropna().unique() if C["latency_batch"] in sub else []
        order = {p: i for i, p in enumerate(PRECISIONS)}
        runs_ = sorted((r for r in registry.current(profile, "quantization") if r.scale == model),
                       key=lambda r: order.get(r.technique, len(order)))  # every repeat, in the table's order
        # latency and throughput: seaborn bars at the mean of the raw repeats with their 95% t interval
        plotting.bars_with_ci(axes[0], runs_, "al_s",
                              f"{C['al_s']}, batch {int(batch[0])}" if len(batch) == 1 else C["al_s"])
        plotting.bars_with_ci(axes[1], runs_, "it", C["it"])
        mb = list(sub[C["disk_bytes"]] / 1e6)
        plotting.bar(axes[2], ps, mb, "MB on disk", value_fmt="{:.2f}")
        plotting.pareto(axes[3], ps, mb, list(sub[C["ppl"]]), "MB on disk", C["ppl"],
                        y_errors=half_widths(sub, C["ppl_se"]))
        fig.suptitle(f"quantization — {model}", fontsize=10)
        paths += plotting.savefig(fig, f"quantization_{model}", profile)
        plt.close(fig)
    return paths


def _sample_grid(fig, recs) -> None:
    grid = fig.subplots(len(recs), 10, squeeze=False)
    for i, r in enumerate(recs):
        for j in range(10):
            img = np.array(r.artifacts["samples"][j])  # [C, H, W] (older records: [H, W]) in [-1, 1]
            img = img[0] if img.ndim == 3 and img.shape[0] == 1 else img
            if img.ndim == 3:
                grid[i][j].imshow(((img.transpose(1, 2, 0) + 1) / 2).clip(0, 1))
            else:
                grid[i][j].imshow(img, cmap="gray_r", vmin=-1, vmax=1)
            grid[i][j].set_axis_off()
        grid[i][0].set_title(r.technique, fontsize=7, loc="left")


def lvm_tables(profile: str) -> dict:
    """{'lvm': Table 10 layout (pretraining, per technique), 'lvm_peft': Table 11 layout (PEFT on the DiT, with the
    efficiency score over AMU, PCU, AL, ST, AEC within each scale)} as DataFrames, from the records."""
    import pandas as pd

    from effllm_utils.engine.adapters import METHODS

    recs = registry.summary(profile, "lvm")  # repeats (other seeds) averaged
    pre = [r for r in recs if not r.scale.endswith("-ft")]
    ft = [r for r in recs if r.scale.endswith("-ft")]
    out = {}
    # the FID's name follows its features: digits-FID on the digits, FID (Inception) otherwise
    fid = "digits-FID" if all(r.artifacts.get("fid_features", "digits").startswith("digits") for r in recs) \
        else "FID (Inception)"
    columns_ = columns(("technique", "scale", "runs", "fid", "fid_se", "fid_real_vs_real", "loss", "amu_gb", "al_s",
                        "tt", "aec_w", "j_per_token", "pcu"), per={"al_s": "iter"}, fid=fid, loss="loss")
    if pre:
        out["lvm"] = aggregate.select_columns(pd.DataFrame(aggregate.table_rows(pre, ("fid",))), columns_)
    if ft:
        order = {m: i for i, m in enumerate(METHODS)}
        ft.sort(key=lambda r: (r.scale, order.get(r.technique, 99)))
        columns_ = columns(("technique", "scale", "task", "runs", "loss", "fid", "fid_se", "fid_before",
                            "fid_real_vs_real", "trainable_params", "amu_gb", "al_s", "st", "aec_w", "j_per_token",
                            "pcu", "efficiency_score"), per={"al_s": "iter"}, technique="method", fid=fid, loss="loss")
        rows = [row | {"task": r.artifacts.get("task")} for r, row in zip(ft, aggregate.table_rows(ft, ("fid",)))]
        out["lvm_peft"] = aggregate.select_columns(with_efficiency_score(pd.DataFrame(rows), "scale"), columns_)
    return out


def lvm_figures(profile: str, study: str = "lvm") -> list:
    """Tables 10 and 11 (CSV/MD/TeX); per part a radar and a grid of samples (digits 0-9 per technique)."""
    import matplotlib.pyplot as plt

    from effllm_utils.report import plots as plotting
    from effllm_utils.report.tables import write_table

    tables = lvm_tables(profile)
    paths = []
    for name, df in tables.items():
        paths += write_table(df, profile, name)
    recs = registry.summary(profile, "lvm")
    plotting.use_style()
    for name, title, keys in (
            ("lvm", "DiT pretraining", ("fid", "amu_gb", "al_s", "tt", "aec_w", "pcu")),
            ("lvm_peft", "PEFT on the DiT", ("fid", "loss", "amu_gb", "al_s", "st", "aec_w", "pcu"))):
        part = [r for r in recs if r.scale.endswith("-ft") == (name == "lvm_peft")]
        if not part:
            continue
        fig = plt.figure(figsize=(16, 4), layout="constrained")
        grid = fig.add_gridspec(1, 3, width_ratios=(1, 0.8, 1))
        ax = fig.add_subplot(grid[0, 0], projection="polar")  # the first scale (tiny has one)
        table = {r.technique: {**r.quality, **r.metrics} for r in part if r.scale == part[0].scale}
        present = [k for k in keys if all(table[t].get(k) is not None for t in table)]
        plotting.radar(ax, table, present)
        fid = "digits-FID" if part[0].artifacts.get("fid_features", "digits").startswith("digits") else "Inception"
        ax.set_title(f"{title}, {part[0].scale} (1 = best; FID is {fid})", fontsize=9)
        axb = fig.add_subplot(grid[0, 1])  # FID of every repeat: seaborn's bar at the mean, 95% t interval
        plotting.bars_with_ci(axb, [r for r in registry.current(profile, "lvm") if r.scale == part[0].scale], "fid",
                              f"FID ({fid})")
        axb.set_title("FID (mean, 95% CI over seeds)", fontsize=9)
        _sample_grid(fig.add_subfigure(grid[0, 2]), [r for r in part if r.scale == part[0].scale])
        paths += plotting.savefig(fig, name, profile)
        plt.close(fig)
    return paths


# -- tables and figures (records only) -----------------------------------------------------------------------------

VLM_COLUMNS = columns(("scale", "technique", "runs", "loss", "loss_se", "frozen_head_floor", "digit_acc",
                       "trainable_params", "amu_gb", "al_s", "st", "aec_w", "j_per_token", "pcu",
                       "efficiency_score"),
                      per={"al_s": "iter"}, **FT_NAMES)


def vlm_table(profile: str):
    """Table 12 layout: one row per (model, method), the efficiency score within each model; repeats (other
    seeds) averaged, with `runs` and the eval loss's standard error where there are any."""
    import pandas as pd

    from effllm_utils.engine.adapters import METHODS

    recs = registry.summary(profile, "vlm")
    if not recs:
        return pd.DataFrame()
    order = {m: i for i, m in enumerate(METHODS)}
    recs.sort(key=lambda r: (r.scale, order.get(r.technique, 99)))
    df = with_efficiency_score(pd.DataFrame(aggregate.table_rows(recs, ("loss",))), "scale")
    return aggregate.select_columns(df, VLM_COLUMNS)


def vlm_figures(profile: str, study: str = "vlm") -> list:
    """Table 12 (CSV/MD/TeX) and, per model, efficiency-score bars and a radar."""
    import matplotlib.pyplot as plt

    from effllm_utils.report import plots as plotting
    from effllm_utils.report.tables import write_table

    t = vlm_table(profile)
    if t.empty:
        return []
    paths = write_table(t, profile, "vlm")
    plotting.use_style()
    keys = RADAR_COLUMNS
    for model, sub in t.groupby("model", sort=False):
        fig = plt.figure(figsize=(14, 3.8), layout="constrained")
        ax1 = fig.add_subplot(1, 3, 1)
        plotting.bar(ax1, list(sub["method"]), list(sub["efficiency score"]), "efficiency score (1 = best)",
                     value_fmt="{:.2f}")
        ax1.set_title(f"vlm: {model} on digits")
        ax3 = fig.add_subplot(1, 3, 3)  # every repeat's eval loss: seaborn's bar at the mean, 95% t interval
        plotting.bars_with_ci(ax3, [r for r in registry.current(profile, "vlm") if r.scale == model], "loss",
                              "eval loss")
        ax3.set_title("eval loss (mean, 95% CI over seeds)", fontsize=9)
        ax2 = fig.add_subplot(1, 3, 2, projection="polar")
        rows = {m: {keys[c]: float(r[c]) for c in keys if r[c] == r[c] and r[c] is not None}
                for m, (_, r) in zip(sub["method"], sub.iterrows())}
        plotting.radar(ax2, rows, [k for k in keys.values() if all(k in rows[m] for m in rows)])
        paths += plotting.savefig(fig, f"vlm_{model}", profile)
        plt.close(fig)
    return paths


def hardware_figures(profile: str, study: str = "hardware") -> list:
    """The hardware study's figure, drawn from its records only."""
    import matplotlib.pyplot as plt

    from effllm_utils.report import plots as plotting

    recs = {r.technique: r for r in runs.load_records(profile, "hardware") if r.status == "ok"}
    if not recs:
        return []
    plotting.use_style()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), layout="constrained")
    for tech in ("matmul_fp32", "matmul_bf16", "matmul_fp16"):
        if tech in recs:
            a = recs[tech].artifacts
            axes[0].errorbar(a["sizes"], a["tflops_median"],
                             yerr=[np.subtract(a["tflops_median"], a["tflops_min"]),
                                   np.subtract(a["tflops_max"], a["tflops_median"])],
                             marker="o", capsize=3, color=plotting.technique_color(tech), label=tech)
    axes[0].set(xscale="log", yscale="log", xlabel="matrix size n", ylabel="TFLOP/s", title="matmul throughput")
    axes[0].legend()
    if "memory_bandwidth" in recs:
        plotting.bar(axes[1], ["memory_bandwidth"], [recs["memory_bandwidth"].metrics["mem_bw_gbs"]], "GB/s")
    axes[1].set_title("copy bandwidth")
    if "telemetry_overhead" in recs:
        r = recs["telemetry_overhead"]
        m = r.metrics
        plotting.bar(axes[2], ["A/B step time", "sampler duty"], [m["telemetry_overhead_pct"], m["sampler_duty_pct"]],
                     "overhead (% of step time)", value_fmt="{:.3f}%",
                     errors=[[m["telemetry_overhead_pct"] - m["overhead_pct_q25"], 0],
                             [m["overhead_pct_q75"] - m["telemetry_overhead_pct"], 0]])
        axes[2].axhline(1.0, color="0.5", ls=":", lw=1)
        axes[2].set_title(f"telemetry overhead at {r.params.get('telemetry_period_s')} s period")
    device = next(iter(recs.values())).environment.get("device_name", "?")
    fig.suptitle(f"hardware calibration — {device}", fontsize=10)
    if "idle_power" in recs:
        w = recs["idle_power"].metrics.get("idle_power_w")
        fig.supxlabel(f"idle power: {w:.1f} W" if w is not None else
                      f"idle power not measurable: {recs['idle_power'].artifacts.get('energy_reason')}", fontsize=8)
    paths = plotting.savefig(fig, "hardware_calibration", profile)
    plt.close(fig)
    return paths
