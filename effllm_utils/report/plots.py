"""The house figure style: one style function, a colour-blind-safe palette, a fixed colour per technique across
every figure, radar / bar / Pareto helpers, and `savefig` writing PDF (TrueType fonts, no timestamp), PNG and SVG
with deterministic metadata under outputs/<profile>/figures/.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from effllm_utils import outputs_dir
from effllm_utils.measure import metrics

# Okabe & Ito (2008), "Color Universal Design", the colour-blind-safe qualitative palette, plus two greys and
# Paul Tol's muted set for groups with more than eight members.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
TOL_MUTED = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499")
PALETTE = OKABE_ITO + TOL_MUTED

# A technique keeps its colour in every figure. Within a study the members get distinct colours.
_GROUPS = (
    ("mha", "gqa", "mqa", "mla", "nsa", "moe"),
    ("rope", "sinusoidal", "learned", "relative", "none"),
    ("dense", "dense_2x", "moe_8x", "moe_8x_half"),
    ("transformer", "mamba", "rwkv", "pythia"),
    ("L2", "L4", "L8", "L12", "L6", "L24", "L36"),
    ("full", "freeze", "lora", "lora_plus", "rslora", "dora", "pissa", "qlora"),
    ("fp32", "fp16", "bf16", "int8", "int4_gptq", "int4_rtn"),
    ("matmul_fp32", "matmul_bf16", "matmul_fp16", "memory_bandwidth", "idle_power", "telemetry_overhead"),
)
TECHNIQUE_COLORS: dict[str, str] = {t: PALETTE[i] for group in _GROUPS for i, t in enumerate(group)}


def technique_color(technique: str) -> str:
    """The fixed colour of a technique; an unknown one gets a stable colour from a hash of its name."""
    if technique in TECHNIQUE_COLORS:
        return TECHNIQUE_COLORS[technique]
    return PALETTE[int(hashlib.sha256(technique.encode()).hexdigest(), 16) % len(PALETTE)]


# Output settings that make files reproducible and fonts editable, applied at save time whatever the style.
_SAVE_RC = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "path", "svg.hashsalt": "effllm"}


HOUSE_RC = {
    "figure.figsize": (6.0, 3.6), "figure.dpi": 110,
    "font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "legend.frameon": False, "axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO), **_SAVE_RC,
}


def use_style() -> None:
    """Apply the house theme through seaborn (call once per notebook; savefig applies the output settings too)."""
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette=list(OKABE_ITO), rc=HOUSE_RC)


def tidy(records, keys: Sequence[str]):
    """Per-run records as a tidy DataFrame, one row per run (technique, scale, seed and the `keys` metrics or
    quality values): the raw repeats seaborn draws error bars and bands from, not their means."""
    import pandas as pd

    return pd.DataFrame([{"technique": r.technique, "scale": r.scale, "seed": r.params.get("seed"),
                          **{k: r.metrics.get(k, r.quality.get(k)) for k in keys}} for r in records])


def curves(records, key: str = "loss_curve"):
    """Per-run training curves in long form (technique, seed, step, value), for seaborn's seed bands."""
    import pandas as pd

    return pd.DataFrame([{"technique": r.technique, "seed": r.params.get("seed"), "step": i + 1, "value": v}
                         for r in records for i, v in enumerate(r.artifacts.get(key) or [])])


def t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean of a few repeats (a bootstrap over 3 seeds is far too narrow); one value: no
    interval. Used as seaborn's `errorbar`."""
    x = np.asarray(values, float)
    if len(x) < 2:
        return float(x.mean()), float(x.mean())
    half = t_half(float(x.std(ddof=1)) / np.sqrt(len(x)), len(x), level)
    return float(x.mean()) - half, float(x.mean()) + half


def t_half(se: float | None, n: int | None, level: float = 0.95) -> float | None:
    """Half-width of the Student's t interval of a mean over `n` repeats with standard error `se` (None for one run):
    what `t_interval` gives from the raw values, for records whose repeats are already averaged (tables' `runs` and
    `*_se` columns, `core.aggregate.mean_repeats`)."""
    from scipy import stats

    if se is None or n is None or not np.isfinite(se) or n < 2:
        return None
    return float(stats.t.ppf(0.5 + level / 2, int(n) - 1)) * float(se)


def record_half(r, key: str) -> float | None:
    """`t_half` of a (`mean_repeats`) record's metric or quality `key` over its repeats."""
    from effllm_utils.core import aggregate

    return t_half(aggregate.standard_error(r, key), aggregate.n_runs(r))


def seed_bands(ax, records, ylabel: str, key: str = "loss_curve") -> None:
    """Training curves per technique with a 95% band over the seeds (Student's t interval of the mean at each step;
    one seed draws the line alone)."""
    import seaborn as sns

    df = curves(records, key)
    if df.empty:
        return
    techs = list(dict.fromkeys(df["technique"]))
    sns.lineplot(df, x="step", y="value", hue="technique", hue_order=techs, ax=ax, errorbar=t_interval,
                 palette={t: technique_color(t) for t in techs}, linewidth=1.2)
    ax.set(xlabel="step", ylabel=ylabel)


def bars_with_ci(ax, records, key: str, ylabel: str) -> None:
    """One bar per technique at the mean over its runs, with a 95% confidence interval from the raw repeats
    (Student's t; no interval for a single run)."""
    import seaborn as sns

    df = tidy(records, [key]).dropna(subset=[key])
    if df.empty:
        return
    techs = list(dict.fromkeys(df["technique"]))
    sns.barplot(df, x="technique", y=key, hue="technique", order=techs, ax=ax, errorbar=t_interval,
                palette={t: technique_color(t) for t in techs}, capsize=0.2, legend=False)
    ax.set(xlabel="", ylabel=ylabel)
    ax.tick_params(axis="x", rotation=30 if len(techs) > 4 else 0)


_SAVE_META = {"pdf": {"CreationDate": None, "ModDate": None, "Producer": "effllm", "Creator": "effllm"},
              "svg": {"Date": None, "Creator": "effllm"}, "png": {"Software": "effllm"}}


# Column widths papers use, in inches (two-column conference and journal templates: ACL, NeurIPS, IEEE ~3.3-3.5 and
# ~6.75-7.16): `make figures` also writes every figure as figures/paper/<name>_double.pdf and, for one-panel
# figures, <name>_single.pdf (a multi-panel figure at 3.5 in would be unreadable).
PAPER_WIDTHS_IN = {"single": 3.5, "double": 7.16}
PAPER_ENV = "EFFLLM_PAPER_FIGURES"  # set (to 1) by `make figures`


def paper_copies(fig, name: str, out: Path) -> list[Path]:
    """PDFs of `fig` at the paper column widths (height in proportion, fonts embedded as TrueType, no timestamps)
    under out/paper/; the figure's own size is restored."""
    w, h = fig.get_size_inches()
    (out / "paper").mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for label, width in PAPER_WIDTHS_IN.items():
            if label == "single" and len(fig.axes) > 1:
                continue
            fig.set_size_inches(width, h * width / w)
            path = out / "paper" / f"{name}_{label}.pdf"
            with plt.rc_context(_SAVE_RC):
                fig.savefig(path, format="pdf", metadata=_SAVE_META["pdf"])
            paths.append(path)
    finally:
        fig.set_size_inches(w, h)
    return paths


def savefig(fig, name: str, profile: str, formats: Sequence[str] = ("pdf", "png", "svg"),
            directory: Path | None = None) -> list[Path]:
    """Write `fig` as outputs/<profile>/figures/<name>.{pdf,png,svg}: TrueType fonts embedded in the PDF, no
    timestamps, fixed SVG ids — the same figure gives the same bytes. With $EFFLLM_PAPER_FIGURES=1 (`make figures`)
    also at the paper column widths (`paper_copies`)."""
    bad = [f for f in formats if f not in _SAVE_META]
    if bad:
        raise ValueError(f"unknown figure format {bad[0]!r}; choose from {', '.join(_SAVE_META)}")
    out = directory or outputs_dir(profile) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with plt.rc_context(_SAVE_RC):
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            fig.savefig(path, format=fmt, metadata=_SAVE_META[fmt], dpi=200, bbox_inches="tight")
            paths.append(path)
    if os.environ.get(PAPER_ENV) == "1":
        paper_copies(fig, name, out)
    return paths


def bar(ax, labels: Sequence[str], values: Sequence[float], ylabel: str, errors: Sequence[float] | None = None,
        value_fmt: str = "{:.3g}"):
    """Bars coloured by technique, value printed on each bar."""
    x = np.arange(len(labels))
    bars = ax.bar(x, values, yerr=errors, color=[technique_color(t) for t in labels], capsize=3)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.bar_label(bars, labels=[value_fmt.format(v) for v in values], fontsize=7, padding=2)
    return bars


def radar(ax, table: dict[str, dict[str, float]], metric_keys: Sequence[str], labels: Sequence[str] | None = None):
    """A radar chart in the paper's convention (its Figure 3): each metric normalised to [0.1, 1] over the
    techniques shown, 1 = best in its direction (effllm_utils.measure.metrics.normalize). `ax` must be polar.

    table: {technique: {metric_key: value}}; axes are labelled with the metrics' names (`metrics.METRICS`) unless
    `labels` are given."""
    techniques = list(table)
    angles = np.linspace(0, 2 * np.pi, len(metric_keys), endpoint=False)
    norm = {k: metrics.normalize([table[t].get(k, np.nan) for t in techniques], metrics.better(k))
            for k in metric_keys}
    for i, t in enumerate(techniques):
        vals = np.array([norm[k][i] for k in metric_keys])
        closed = np.append(vals, vals[0])
        ang = np.append(angles, angles[0])
        ax.plot(ang, closed, color=technique_color(t), label=t, lw=1.5)
        ax.fill(ang, closed, color=technique_color(t), alpha=0.08)
    ax.set_xticks(angles, labels or [metrics.METRICS[k].name if k in metrics.METRICS else k for k in metric_keys])
    ax.set_ylim(0, 1.05)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0], ["", "", "", "1"])
    ax.legend(loc="upper left", bbox_to_anchor=(1.05, 1.0))
    return ax


def pareto_front(x: Sequence[float], y: Sequence[float], x_better: str = "lower", y_better: str = "lower") -> list[int]:
    """Indices of the non-dominated points, sorted by x."""
    xs = np.asarray(x, float) * (1 if x_better == "lower" else -1)
    ys = np.asarray(y, float) * (1 if y_better == "lower" else -1)
    front = [i for i in range(len(xs))
             if not any((xs[j] <= xs[i] and ys[j] <= ys[i]) and (xs[j] < xs[i] or ys[j] < ys[i])
                        for j in range(len(xs)))]
    return sorted(front, key=lambda i: xs[i])


def pareto(ax, labels: Sequence[str], x: Sequence[float], y: Sequence[float], xlabel: str, ylabel: str,
           x_better: str = "lower", y_better: str = "lower", y_errors: Sequence[float | None] | None = None):
    """Scatter coloured by technique with the Pareto front drawn through the non-dominated points; `y_errors`
    (half-widths of each point's 95% t interval over its repeats, `t_half`/`record_half`; None or NaN where a point is
    one run) as vertical error bars."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    span = [max(np.ptp(v[np.isfinite(v)]) if np.isfinite(v).any() else 0.0, 1e-12) for v in (xs, ys)]
    errs = np.asarray([np.nan if e is None else e for e in y_errors], float) if y_errors is not None else None
    for i, (t, xi, yi) in enumerate(zip(labels, xs, ys)):
        ax.scatter([xi], [yi], color=technique_color(t), s=36, zorder=3)
        if errs is not None and np.isfinite(errs[i]):
            ax.errorbar([xi], [yi], yerr=[errs[i]], color=technique_color(t), capsize=3, lw=1, zorder=3)
        # labels of points that (nearly) coincide are stacked downwards instead of printed over each other
        near = sum(abs(xi - xs[j]) < 0.03 * span[0] and abs(yi - ys[j]) < 0.03 * span[1] for j in range(i))
        ax.annotate(t, (xi, yi), textcoords="offset points", xytext=(4, 3 - 9 * near), fontsize=7)
    front = pareto_front(x, y, x_better, y_better)
    ax.plot([x[i] for i in front], [y[i] for i in front], color="0.4", lw=1, ls="--", zorder=2, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return front
