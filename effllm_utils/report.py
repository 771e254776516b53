"""Paper figures, tables beside the paper's values, the claims check, and a static HTML report — from records only.

    python -m effllm_utils.report --profile tiny          # make report: outputs/<profile>/report/index.html
    python -m effllm_utils.report --profile tiny --no-html  # the figures and tables only (what make figures runs)

`paper_figures(profile)` re-draws every study's figures and tables (effllm_utils.figures), writes the Pareto fronts
across studies, the comparison tables (our measurement beside the paper's for the same technique — a different scale
and hardware, so orderings are comparable, values are not) and the claims check (effllm_utils.claims) under
outputs/<profile>/tables/. `build_report(profile)` then writes one self-contained folder: index.html, the PNG figures
and the tables, opening from disk in any browser (no server, no network); a small script on the page flags an image
that fails to load.
"""
from __future__ import annotations

import argparse
import datetime as dt
import html
import os
import shutil
import sys
from pathlib import Path

from . import PROFILES, outputs_dir, runs

# study -> how the paper's rows map onto our techniques for the comparison table:
# (file, {column: value} filter, method column, {paper name: technique}, {our metric: paper column}, what the rows are)
_ARCH = {"ppl": "ppl", "amu_gb": "amu_gb", "al_s": "al_s_per_iter", "tt": "tt_tokens_per_param_s", "aec_w": "aec_w"}
PAPER_ROWS = {
    "attention": ("pretrain_architecture.csv", {"paper_table": "3", "scale": "1.5B"}, "method",
                  {"MQA": "mqa", "GQA": "gqa", "MLA": "mla", "NSA": "nsa"}, _ARCH, "Table 3, 1.5B"),
    "positional_encoding": ("pretrain_architecture.csv", {"paper_table": "4"}, "method",
                            {"RoPE": "rope", "Absolute": "sinusoidal", "Learnable Absolute": "learned",
                             "Relative (Relate)": "relative", "None": "none"}, _ARCH, "Table 4, 1.5B"),
    "moe": ("pretrain_architecture.csv", {"paper_table": "5"}, "method",
            {"Dense 1.5B": "dense", "Dense 3B": "dense_2x", "MoE 1.5Bx8": "moe_8x", "MoE 0.5Bx8": "moe_8x_half"}, _ARCH,
            "Table 5 (1.5B dense, 3B dense, 1.5Bx8 and 0.5Bx8 top-2 MoE)"),
    "attention_free": ("pretrain_architecture.csv", {"paper_table": "6"}, "method",
                       {"Transformer (Qwen2.5)": "transformer", "Mamba": "mamba", "RWKV": "rwkv", "Pythia": "pythia"},
                       _ARCH, "Table 6, 1.5B"),
    "peft": ("peft.csv", {"paper_table": "7", "model": "Llama-3.2-1B"}, "method",
             {"LoRA": "lora", "LoRA-plus": "lora_plus", "RSLoRA": "rslora", "DoRA": "dora", "PiSSA": "pissa",
              "Freeze": "freeze", "Full*": "full"},
             {"loss": "loss", "amu_gb": "amu_gb", "al_s": "al_s_per_iter", "st": "st_samples_per_param_s",
              "aec_w": "aec_w"}, "Table 7, Llama-3.2-1B on OpenO1-SFT"),
    "quantization": ("quantization.csv", {"model": "DeepSeek-R1-Distill-Qwen-14B"}, "precision",
                     {"bfloat16": "bf16", "float16": "fp16", "int4": "int4_gptq"},
                     {"score": "avg_perf", "amu_gb": "amu_gb", "it": "it_tokens_per_s", "aec_w": "aec_w", "mcr": "mcr"},
                     "Table 9, DeepSeek-R1-Distill-Qwen-14B"),
    "lvm": ("lvm_vlm.csv", {"paper_table": "10"}, "method",
            {"MHA": "mha", "MQA": "mqa", "GQA": "gqa", "MLA": "mla", "NSA": "nsa"},
            {"fid": "quality", "amu_gb": "amu_gb", "al_s": "al_s_per_iter", "tt": "throughput", "aec_w": "aec_w"},
            "Table 10, DiT-XL/2 on ImageNet (Inception FID; ours is digits-FID)"),
    "vlm": ("lvm_vlm.csv", {"paper_table": "12", "model": "Qwen2.5-VL-7B"}, "method",
            {"LoRA": "lora", "LoRA-plus": "lora_plus", "RSLoRA": "rslora", "PiSSA": "pissa", "Full*": "full"},
            {"loss": "quality", "amu_gb": "amu_gb", "al_s": "al_s_per_iter", "st": "throughput", "aec_w": "aec_w"},
            "Table 12, Qwen2.5-VL-7B"),
}
UNITS = {"ppl": "PPL", "loss": "loss", "amu_gb": "AMU (GB)", "al_s": "AL (s)", "tt": "TT (tokens/param/s)",
         "st": "ST (samples/param/s)", "aec_w": "AEC (W)", "score": "score", "it": "IT (tokens/s)", "mcr": "MCR",
         "fid": "FID"}


def paper_values(study: str):
    """The paper's rows of a study as {technique: {metric: value}} and a description of the rows."""
    import pandas as pd

    from . import repo_root

    file, where, col, names, metrics, what = PAPER_ROWS[study]
    df = pd.read_csv(repo_root() / "reference" / "efficientllm_paper_values" / file, keep_default_na=False,
                     na_values=[""])
    for k, v in where.items():
        df = df[df[k].astype(str) == v]
    out = {}
    for _, row in df.iterrows():
        if row[col] in names and names[row[col]] not in out:
            out[names[row[col]]] = {m: float(row[c]) for m, c in metrics.items() if pd.notna(row.get(c))}
    return out, what


def comparison(profile: str, study: str):
    """Our measurement beside the paper's, one row per technique we ran (first scale / dataset group of each)."""
    import pandas as pd

    recs = [r for r in runs.load_summary(profile, study) if not r.scale.endswith("-ft")]  # repeats averaged
    if not recs or study not in PAPER_ROWS:
        return pd.DataFrame()
    paper, what = paper_values(study)
    first = recs[0].scale, recs[0].params.get("dataset") if isinstance(recs[0].params, dict) else None
    rows = []
    for r in recs:
        if (r.scale, r.params.get("dataset") if isinstance(r.params, dict) else None) != first:
            continue
        row = {"technique": r.technique}
        for m in PAPER_ROWS[study][4]:
            ours = r.metrics.get(m, r.quality.get(m))
            row[f"ours: {UNITS[m]}"] = ours
            row[f"paper: {UNITS[m]}"] = paper.get(r.technique, {}).get(m)
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["caption"] = (f"ours: {profile} profile, {first[0]}" + (f" / {first[1]}" if first[1] else "") +
                           f", {recs[0].environment.get('device_name', '?')}; paper: {what}, H100/GH200 clusters. "
                           "Different scale and hardware: compare orderings, not values.")
    return df.dropna(axis=1, how="all")


def write_with_caption(df, profile: str, name: str) -> list[Path]:
    from .pretrain import write_table

    paths = write_table(df, profile, name)
    if df.attrs.get("caption"):  # the Markdown carries the caption above the table
        runs.atomic_write_text(paths[1], f"{df.attrs['caption']}\n\n" + paths[1].read_text())
    return paths


# -- figures across studies ----------------------------------------------------------------------------------------

QUALITY = {"attention": "ppl", "positional_encoding": "ppl", "moe": "ppl", "attention_free": "ppl",
           "depth_width": "ppl", "peft": "loss", "quantization": "ppl", "lvm": "fid", "vlm": "loss"}


def pareto_fronts(profile: str) -> list[Path]:
    """Quality against energy (where measured) and against latency, one panel per study, Pareto front drawn."""
    import matplotlib.pyplot as plt

    from . import plotting

    panels = []
    for study, q in QUALITY.items():
        recs = [r for r in runs.load_summary(profile, study) if r.quality.get(q) is not None
                and not r.scale.endswith("-ft")]
        if len({r.scale for r in recs}) > 1 or study == "peft":  # one group per panel: the first
            first = (recs[0].scale, recs[0].params.get("dataset")) if recs else None
            recs = [r for r in recs if (r.scale, r.params.get("dataset")) == first]
        if len(recs) >= 2:
            panels.append((study, q, recs))
    if not panels:
        return []
    plotting.use_style()
    paths = []
    for cost, label in (("energy_j", "energy (J)"), ("al_s", "AL (s)")):
        usable = [(s, q, rs) for s, q, rs in panels if all(r.metrics.get(cost) for r in rs)]
        if not usable:
            continue
        cols = min(3, len(usable))
        rows_n = -(-len(usable) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), layout="constrained",
                                 squeeze=False)
        for ax, (study, q, rs) in zip(axes.flat, usable):
            plotting.pareto(ax, [r.technique for r in rs], [r.metrics[cost] for r in rs], [r.quality[q] for r in rs],
                            label, q, y_errors=[runs.standard_error(r, q) for r in rs])
            ax.set_title(study, fontsize=9)
        for ax in list(axes.flat)[len(usable):]:
            ax.set_axis_off()
        missing = [s for s, _, _ in panels if s not in {u[0] for u in usable}]
        fig.suptitle(f"quality vs {label} ({profile})" + (f" — not measured for: {', '.join(missing)}" if missing
                                                             else ""), fontsize=10)
        paths += plotting.savefig(fig, f"pareto_{cost}", profile)
        plt.close(fig)
    return paths


def paper_figures(profile: str, margin: float = 0.05) -> dict:
    """Every figure and table from the records: the studies' own, the Pareto fronts, the comparisons with the
    paper and the claims check. Returns {'figures': [...], 'tables': [...], 'claims': DataFrame}."""
    from . import claims, figures

    drawn = figures.draw(profile)
    paths = [p for ps in drawn.values() for p in ps]
    paths += pareto_fronts(profile)
    for study in PAPER_ROWS:
        df = comparison(profile, study)
        if not df.empty:
            paths += write_with_caption(df, profile, f"paper_vs_ours_{study}")
    checked = claims.evaluate(profile, margin=margin)
    checked.attrs["caption"] = (f"Claims check ({profile}): verdicts on our records (margin {margin:.0%}, see "
                                "effllm_utils/claims.py) and on the paper's own quoted numbers.")
    paths += write_with_caption(checked, profile, "claims")
    return {"figures": [p for p in paths if p.suffix == ".png"], "tables": [p for p in paths if p.suffix == ".csv"],
            "claims": checked}


# -- the HTML report -----------------------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 6px;
text-align:right;vertical-align:top}td:first-child,th:first-child{text-align:left}img{max-width:100%;
border:1px solid #eee}.v-reproduced{background:#d9f0d3}.v-contradicted{background:#f6d5d5}.v-inconclusive{
background:#fdf1c8}.v-untestable{background:#eee}.caption{color:#555;font-size:13px}#broken{display:none;
background:#f6d5d5;padding:.5em}.claims td{text-align:left;max-width:420px}.warn{background:#fdf1c8;padding:.5em}"""
CHECK_IMAGES = """window.addEventListener("load", () => {
  const imgs = [...document.images], bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  document.body.dataset.imagesLoaded = imgs.length - bad.length;
  document.body.dataset.imagesFailed = bad.length;
  if (bad.length) { const b = document.getElementById("broken"); b.style.display = "block";
    b.textContent = bad.length + " image(s) failed to load: " + bad.map(i => i.getAttribute("src")).join(", "); }
  bad.forEach(i => console.error("image failed to load: " + i.getAttribute("src")));
});"""


def _table_html(df, claims: bool = False) -> str:
    import pandas as pd

    if claims:
        cells = []
        for _, r in df.iterrows():
            cls = "v-" + str(r["verdict"]).split()[0].replace("not", "untestable")
            cells.append("<tr>" + "".join(
                f'<td class="{cls}">' + html.escape(str(r[c])) + "</td>" if c == "verdict"
                else "<td>" + html.escape(str(r[c])) + "</td>" for c in df.columns) + "</tr>")
        head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
        return f'<table class="claims"><tr>{head}</tr>{"".join(cells)}</table>'
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:.4g}"
        return "" if v is None else str(v)

    return df.to_html(index=False, border=0, formatters={c: cell for c in df.columns}, escape=True, na_rep="")


def build_report(profile: str, margin: float = 0.05) -> Path:
    """outputs/<profile>/report/index.html with every figure, table and the claims check (written atomically as a
    folder: a reader never sees half a report)."""
    import pandas as pd

    from . import STUDIES, __version__

    made = paper_figures(profile, margin)
    out = outputs_dir(profile) / "report"
    tables_dir = outputs_dir(profile) / "tables"
    env = runs.environment()
    studies = [s for s in STUDIES if s != "paper_figures"]
    with runs.atomic_dir(out, replace=True) as tmp:
        (tmp / "figures").mkdir()
        (tmp / "tables").mkdir()

        def figure(p: Path) -> str:
            shutil.copy2(p, tmp / "figures" / p.name)
            return f'<p><img src="figures/{p.name}" alt="{html.escape(p.stem)}"></p>'

        def table(p: Path) -> str:
            for ext in (".csv", ".md", ".tex"):
                if p.with_suffix(ext).is_file():
                    shutil.copy2(p.with_suffix(ext), tmp / "tables" / p.with_suffix(ext).name)
            md = p.with_suffix(".md").read_text() if p.with_suffix(".md").is_file() else ""
            caption = md.split("\n\n", 1)[0] if md and not md.startswith("|") else ""
            return (f"<h3>{html.escape(p.stem)}</h3>" + (f'<p class="caption">{html.escape(caption)}</p>' if caption
                                                          else "") + _table_html(pd.read_csv(p)) +
                    f'<p class="caption">as <a href="tables/{p.stem}.csv">CSV</a>, <a href="tables/{p.stem}.md">'
                    f'Markdown</a>, <a href="tables/{p.stem}.tex">LaTeX</a></p>')

        toc, sections = [("claims", "claims check")], []
        sections.append('<h2 id="claims">Claims check</h2>' + f'<p class="caption">'
                        f'{html.escape(made["claims"].attrs["caption"])}</p>' + _table_html(made["claims"], claims=True)
                        + table(tables_dir / "claims.csv").split("</table>", 1)[1])
        for study in studies:
            figs = sorted(p for p in made["figures"] if p.stem == study or p.stem.startswith(study + "_"))
            tabs = sorted(p for p in tables_dir.glob("*.csv") if p.stem in (study, f"{study}_peft")
                          or p.stem == f"paper_vs_ours_{study}")
            if figs or tabs:
                toc.append((study, study))
                sections.append(f'<h2 id="{study}">{study}</h2>' + "".join(map(figure, figs)) +
                                "".join(map(table, tabs)))
        pareto = sorted(p for p in made["figures"] if p.stem.startswith("pareto_"))
        if pareto:
            toc.append(("pareto", "Pareto fronts"))
            sections.append('<h2 id="pareto">Pareto fronts across studies</h2>' + "".join(map(figure, pareto)))
        drift = runs.package_drift([r for s in studies for r in runs.load_current(profile, s)])
        warning = ('<div class="warn"><b>Package versions differ</b> between the records shown or from this install '
                   "(the locked versions): compare their numbers with care, or re-run with "
                   f"<code>make reproduce PROFILE={profile} ARGS=--force</code>.<ul>"
                   + "".join(f"<li>{html.escape(d)}</li>" for d in drift) + "</ul></div>") if drift else ""
        header = (f"<h1>effllm report — profile <code>{profile}</code></h1>"
                  f'<p class="caption">effllm {__version__}, git {html.escape(str(env.get("git_sha")))}'
                  f'{" (dirty)" if env.get("git_dirty") else ""}, built '
                  f'{dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")} on '
                  f'{html.escape(str(env.get("device_name")))}. Everything here is drawn from the stored run records '
                  f'(outputs/{profile}/runs). The paper\'s values are second-hand (reference/efficientllm_paper_values/'
                  f'README.md) and come from a different scale and hardware.</p>{warning}<div id="broken"></div><ul>'
                  + "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in toc) + "</ul>")
        page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>effllm report — {profile}</title>'
                f"<style>{CSS}</style></head><body>{header}{''.join(sections)}<script>{CHECK_IMAGES}</script>"
                "</body></html>\n")
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effllm_utils.report", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "tiny"), choices=PROFILES)
    ap.add_argument("--margin", type=float, default=0.05, help="relative gap below which a single run is inconclusive")
    ap.add_argument("--no-html", action="store_true", help="figures and tables only")
    args = ap.parse_args(argv)
    if not runs.runs_dir(args.profile).is_dir():
        print(f"error: no records for profile {args.profile!r} under {runs.runs_dir(args.profile)}; run "
              f"`make reproduce PROFILE={args.profile}` first", file=sys.stderr)
        return 2
    if args.no_html:
        made = paper_figures(args.profile, args.margin)
        print(f"{len(made['figures'])} figures, {len(made['tables'])} tables under {outputs_dir(args.profile)}")
    else:
        print(f"report: {build_report(args.profile, args.margin)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
