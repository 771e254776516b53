"""A static HTML report, outputs/<profile>/report/index.html: every figure, table and the claims check in one folder
that opens from disk (no server, no network); a small script on the page flags an image that fails to load.
"""
from __future__ import annotations

import datetime as dt
import html
import math
import re
import shutil
from collections import Counter
from pathlib import Path

from effllm_utils import outputs_dir
from effllm_utils.core import provenance, runs
from effllm_utils.report.overview import paper_figures
from effllm_utils.studies import registry

# -- the HTML report -----------------------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 6px;
text-align:right;vertical-align:top}td:first-child,th:first-child{text-align:left}img{max-width:100%;
border:1px solid #eee}.v-reproduced{background:#d9f0d3}.v-contradicted{background:#f6d5d5}.v-inconclusive{
background:#fdf1c8}.v-untestable{background:#eee}.caption{color:#555;font-size:13px}#broken{display:none;
background:#f6d5d5;padding:.5em}.claims td{text-align:left;max-width:420px}.warn{background:#fdf1c8;padding:.5em}
.cards{display:flex;flex-wrap:wrap;gap:.6em;margin:.5em 0 1.5em}.card{border:1px solid #ccc;border-radius:6px;
padding:.5em .7em;width:360px;font-size:13px}.card .verdict{font-weight:600;padding:0 .3em}.card .level{color:#555;
font-size:12px}.study{display:flex;gap:1em;align-items:flex-start;flex-wrap:wrap}.study img{max-width:420px}
th{cursor:pointer}th.sorted-asc:after{content:" \\25B2"}th.sorted-desc:after{content:" \\25BC"}"""
SORT_TABLES = """document.querySelectorAll("table").forEach(t => {
  const head = t.querySelector("tr"); if (!head || !head.querySelector("th")) return;
  head.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
    const rows = [...t.querySelectorAll("tr")].filter(r => r !== head && r.querySelector("td"));
    const asc = !th.classList.contains("sorted-asc");
    head.querySelectorAll("th").forEach(h => h.classList.remove("sorted-asc", "sorted-desc"));
    th.classList.add(asc ? "sorted-asc" : "sorted-desc");
    const key = r => { const v = (r.children[col] || {}).textContent || ""; const n = parseFloat(v);
                       return isNaN(n) ? v : n; };
    rows.sort((a, b) => { const x = key(a), y = key(b);
      return (typeof x === typeof y ? (x > y) - (x < y) : typeof x === "number" ? -1 : 1) * (asc ? 1 : -1); });
    rows.forEach(r => r.parentNode.appendChild(r));
  }));
});"""
CHECK_IMAGES = """window.addEventListener("load", () => {
  const imgs = [...document.images], bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  document.body.dataset.imagesLoaded = imgs.length - bad.length;
  document.body.dataset.imagesFailed = bad.length;
  if (bad.length) { const b = document.getElementById("broken"); b.style.display = "block";
    b.textContent = bad.length + " image(s) failed to load: " + bad.map(i => i.getAttribute("src")).join(", "); }
  bad.forEach(i => console.error("image failed to load: " + i.getAttribute("src")));
});"""


def _verdict_class(verdict) -> str:
    """The CSS class that colours a verdict (reproduced, contradicted, inconclusive, not testable)."""
    return "v-" + str(verdict).split()[0].replace("not", "untestable")


def _table_html(df, claims: bool = False) -> str:
    import pandas as pd

    if claims:
        cells = []
        for _, r in df.iterrows():
            cls = _verdict_class(r["verdict"])
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


_EFFECT = re.compile(r"(\S+ \S+/\S+) ([\d.e+-]+)x \[([\d.e+-]+), ([\d.e+-]+)\]")


def forest(effect: str, width: int = 300) -> str:
    """A small forest plot (inline SVG) of a claims row's effects: each ratio with its confidence interval (the
    claims check's level, 1 - alpha) on a log axis, the line of no difference at 1; "" where the effect states no
    interval."""
    import math

    found = [(label, float(r), float(lo), float(hi)) for label, r, lo, hi in _EFFECT.findall(effect)
             if 0 < float(lo) <= float(r) <= float(hi)]
    if not found:
        return ""
    lo_ax = math.log(min(0.5, *(f[2] for f in found)))
    hi_ax = math.log(max(2.0, *(f[3] for f in found)))
    x0, x1 = 110, width - 10

    def x(v: float) -> float:
        return x0 + (math.log(v) - lo_ax) / (hi_ax - lo_ax) * (x1 - x0)

    rows = [f'<line x1="{x(1):.1f}" y1="2" x2="{x(1):.1f}" y2="{16 * len(found) + 2}" stroke="#999" '
            f'stroke-dasharray="3,2"/>']
    for i, (label, r, lo, hi) in enumerate(found):
        y = 10 + 16 * i
        rows.append(f'<text x="0" y="{y + 4}" font-size="10">{html.escape(label[-18:])}</text>'
                    f'<line x1="{x(lo):.1f}" y1="{y}" x2="{x(hi):.1f}" y2="{y}" stroke="#333" stroke-width="1.5"/>'
                    f'<circle cx="{x(r):.1f}" cy="{y}" r="3" fill="#0072B2"><title>{r:.3g}x [{lo:.3g}, {hi:.3g}]'
                    f'</title></circle>')
    return (f'<svg class="forest" width="{width}" height="{16 * len(found) + 6}" role="img" '
            f'aria-label="effects with confidence intervals">{"".join(rows)}</svg>')


def summary(claims, figures: list[Path], figure) -> str:
    """The report's opening: per study its first figure and its verdicts as cards (claim, verdict, evidence level,
    effect with its interval as a forest plot)."""
    blocks = []
    for study, rows in claims.groupby("study", sort=False):
        figs = sorted(p for p in figures if p.stem == study or p.stem.startswith(study + "_"))
        cards = []
        for _, r in rows.iterrows():
            cls = _verdict_class(r["verdict"])
            cards.append(f'<div class="card"><div>{html.escape(str(r["claim"]))}</div>'
                         f'<div><span class="verdict {cls}">{html.escape(str(r["verdict"]))}</span>'
                         f'{" [" + html.escape(str(r["group"])) + "]" if str(r["group"]) else ""}</div>'
                         f'<div class="level">{html.escape(str(r["evidence level"]))}</div>'
                         f'<div>{html.escape(str(r["effect"]))}</div>{forest(str(r["effect"]))}</div>')
        blocks.append(f'<h3>{html.escape(study)}</h3><div class="study">{figure(figs[0]) if figs else ""}'
                      f'<div class="cards">{"".join(cards)}</div></div>')
    return '<h2 id="summary">Summary</h2>' + "".join(blocks)


NOTEBOOK_PAGE = ('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>'
                 "body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}"
                 "pre{{background:#f6f6f6;padding:.5em;overflow-x:auto;font-size:12px}}img{{max-width:100%}}"
                 ".jp-InputPrompt,.jp-OutputPrompt{{color:#888;font-size:11px}}</style></head><body>"
                 '<p><a href="../index.html">back to the report</a> · executed {when}</p>{body}</body></html>\n')


def notebooks_html(profile: str, dest: Path) -> list[tuple[str, str]]:
    """Every executed notebook of this profile's batch (outputs/<profile>/notebooks/*.ipynb, written by `make
    reproduce`) as dest/<name>.html: nbconvert's basic template (its figures embedded) in a page of its own with no
    script and nothing fetched, so it opens from disk. [(name, file name)] in name order; a notebook nbconvert
    cannot read is listed with the reason instead."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    import logging

    quiet = logging.getLogger("effllm.report.nbconvert")  # not the kernel's logger: its alt-text notices are noise here
    quiet.setLevel(logging.ERROR)
    exporter = HTMLExporter(template_name="basic", log=quiet)
    # a progress bar's redraws are one stream output each: merged, and the carriage returns resolved
    exporter.register_preprocessor(CoalesceStreamsPreprocessor(enabled=True), enabled=True)
    out = []
    for nb in sorted((outputs_dir(profile) / "notebooks").glob("*.ipynb")):
        if nb.name.startswith("."):  # a notebook still running (papermill's partial file)
            continue
        when = dt.datetime.fromtimestamp(nb.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
        try:
            node = nbformat.read(nb, as_version=4)
            for cell in node.cells:  # widgets (a notebook progress bar) render as scripts: keep their text form
                for o in cell.get("outputs", []):
                    o.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
            body, _ = exporter.from_notebook_node(node)
        except Exception as e:  # noqa: BLE001 - one unreadable notebook never costs the report
            out.append((nb.stem, f"not converted: {type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            continue
        dest.mkdir(parents=True, exist_ok=True)
        (dest / f"{nb.stem}.html").write_text(NOTEBOOK_PAGE.format(title=html.escape(nb.stem), when=when, body=body),
                                              encoding="utf-8")
        out.append((nb.stem, f"{nb.stem}.html"))
    return out


def environment_html(env: dict) -> str:
    """This install's environment (provenance.environment: git, Python, platform, CPU, device, package versions) as
    a two-column table; each record carries its own (the report's warnings flag any that differ)."""
    rows = "".join(f"<tr><td>{html.escape(k.removesuffix('_version'))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in env.items() if k != "hostname")
    return f"<table><tr><th>what</th><th>value</th></tr>{rows}</table>"


def build_report(profile: str, alpha: float = 0.05, made: dict | None = None) -> Path:
    """outputs/<profile>/report/index.html with every figure, table and the claims check (written atomically as a
    folder: a reader never sees half a report). `made`: `overview.paper_figures`'s result when it has just run (the
    paper_figures notebook passes it, so the batch's report costs no second drawing)."""
    import pandas as pd

    from effllm_utils import __version__

    made = made if made is not None else paper_figures(profile, alpha)
    out = outputs_dir(profile) / "report"
    tables_dir = outputs_dir(profile) / "tables"
    env = provenance.environment()
    studies = [s for s in registry.names() if s != "paper_figures"]
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

        toc, sections = [("summary", "summary"), ("claims", "claims check")], []
        sections.append(summary(made["claims"], made["figures"], figure))
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
        converted = notebooks_html(profile, tmp / "notebooks")
        if converted:
            toc.append(("notebooks", "executed notebooks"))
            sections.append('<h2 id="notebooks">Executed notebooks</h2><p class="caption">as <code>make reproduce'
                            '</code> ran them (outputs/' + profile + '/notebooks), with every output</p><ul>' + "".join(
                                f'<li><a href="notebooks/{html.escape(f)}">{html.escape(n)}</a></li>' if
                                f.endswith(".html") else f"<li>{html.escape(n)}: {html.escape(f)}</li>"
                                for n, f in converted) + "</ul>")
        toc.append(("environment", "environment"))
        sections.append('<h2 id="environment">Environment</h2><p class="caption">this install, which built the report '
                        "(each record keeps the environment it ran in)</p>" + environment_html(env))
        warning = _warnings(profile, studies) + _energy_warning(made["claims"])
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
                f"<script>{SORT_TABLES}</script>"
                "</body></html>\n")
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def _energy_warning(checked) -> str:
    """A flag for every claim on average power whose verdict J/token reverses (`claims.DISAGREE`)."""
    from effllm_utils.report.claims import DISAGREE, ENERGY_COLUMN

    rows = checked[checked[ENERGY_COLUMN].astype(str).str.contains(DISAGREE, regex=False)]
    if rows.empty:
        return ""
    return ('<div class="warn"><b>Power and energy per token disagree</b>: average power rewards slow kernels; '
            "these power claims come out the other way in J/token (see the claims check).<ul>"
            + "".join(f"<li>{html.escape(str(r['id']))} [{html.escape(str(r['group']))}]: "
                      f"{html.escape(str(r['verdict']))} on power; {html.escape(str(r[ENERGY_COLUMN]))}</li>"
                      for _, r in rows.iterrows())
            + "</ul></div>")


def _run_named(run_id: str) -> str:
    """"study technique" of a run id (`runs.make_run_id`: study--technique--...)."""
    return " ".join(run_id.split("--")[:2])


def sweep_edges(records) -> list[str]:
    """One line per (study, technique, scale) whose best learning rate is the smallest or largest its LR sweep tried
    (`claims.sweep_edge`): its optimum may lie beyond the grid, so its comparison may not be at its best. A record
    that copies another study's run says whose, so one run flagged in several studies reads as one."""
    from effllm_utils.report.claims import sweep_edge

    out = {}
    for r in records:
        sweep = r.artifacts.get("lr_sweep")
        if isinstance(sweep, dict) and (edge := sweep_edge(sweep)):
            copy = r.artifacts.get("same_run_as")
            out[(r.study, r.technique, r.scale)] = (
                f"{r.study} {r.technique} at {r.scale}: best LR {float(sweep['best']):.3g} is the {edge[0]} its "
                f"sweep tried ({edge[1]:.3g}-{edge[2]:.3g})"
                + (f" (the run of {_run_named(copy)})" if copy else ""))
    return [out[k] for k in sorted(out)]


def copied_runs(records) -> list[str]:
    """One line per (study, technique, run copied) whose records are another study's run (`same_run_as`: the default
    backbone, trained once): which run, and how many of the records (sweep points and seeds) are its copies."""
    counts = Counter((r.study, r.technique, _run_named(donor)) for r in records
                     if (donor := r.artifacts.get("same_run_as")))
    return [f"{study} {technique} = {donor} ({n} record{'s' if n > 1 else ''})"
            for (study, technique, donor), n in sorted(counts.items())]


def _warnings(profile: str, studies: list[str]) -> str:
    """The report's warnings: package versions that differ between records or from this install, stale records, runs
    that shared the CPUs with other work, best learning rates at a sweep's edge."""
    current = [r for s in studies for r in registry.current(profile, s)]  # read once, for every check
    drift = provenance.package_drift(current)
    warning = ('<div class="warn"><b>Package versions differ</b> between the records shown or from this install '
               "(the locked versions): compare their numbers with care, or re-run with "
               f"<code>make reproduce PROFILE={profile} ARGS=--force</code>.<ul>"
               + "".join(f"<li>{html.escape(d)}</li>" for d in drift) + "</ul></div>") if drift else ""
    old = provenance.stale([r for s in studies for r in runs.load_records(profile, s) if r.status == "ok"])
    if old:
        warning += ('<div class="warn"><b>Stale records</b>: made by other measurement or model code than this '
                    "checkout's (their code version differs); tables and claims never average them with fresh "
                    "ones. Refresh with <code>make reproduce PROFILE=" + profile + ' ARGS="--only '
                    + ",".join(old) + '"</code> (new code, new run ids: they are measured again).<ul>'
                    + "".join(f"<li>{html.escape(s)}: {len(rs)} record(s), e.g. {html.escape(rs[0].run_id)}</li>"
                              for s, rs in old.items()) + "</ul></div>")
    shared = provenance.shared_cpu(current)
    if shared:
        warning += ('<div class="warn"><b>Runs that shared the CPUs</b> with other work (other processes took more '
                    f"than {provenance.SHARED_CPU_WARN:.0%} of the host's CPU capacity while they ran): their step "
                    "times, throughput, latency and energy are suspect (quality is not), and the claims check sets "
                    "them aside from its time and energy tests. Re-run them alone with <code>--force</code>.<ul>"
                    + "".join(f"<li>{html.escape(r.run_id)}: {r.environment['host_other_cpu_frac']:.0%}</li>"
                              for r in shared) + "</ul></div>")
    changed = runs.shared_copies_changed(current)
    if changed:
        warning += ('<div class="warn"><b>Shared runs out of date</b>: these records took another study\'s run '
                    "(the same model, budget, learning rate and seed), which has changed since; refresh them with "
                    f"<code>make reproduce PROFILE={profile} ARGS=\"--only "
                    + ",".join(sorted({r.study for r, _ in changed})) + ' --force"</code>.<ul>'
                    + "".join(f"<li>{html.escape(r.run_id)}: {html.escape(why)}</li>" for r, why in changed)
                    + "</ul></div>")
    if copies := copied_runs(current):
        warning += ("<p>Records that are another study's run, recorded in this one too (the default backbone, trained "
                    "once: same model, budget, learning rate and seed; their times were measured in that study's slot "
                    "of the batch): " + "; ".join(html.escape(c) for c in copies) + ".</p>")
    edges = sweep_edges(current)
    if edges:
        warning += ('<div class="warn"><b>Best learning rate at the edge of its sweep</b>: the optimum may lie beyond '
                    "the grid, so these techniques may be compared below their best; widen the sweep (<code>--set "
                    "lr_sweep_points=5</code>) or centre it (the study's <code>lr</code>).<ul>"
                    + "".join(f"<li>{html.escape(e)}</li>" for e in edges) + "</ul></div>")
    return warning
