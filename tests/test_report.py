"""Paper figures, comparison tables and the static HTML report, rendered in headless Chromium."""
import re
import shutil
import subprocess

import pytest

from effllm_utils.core import provenance, runs
from effllm_utils.report import overview, paper, webpage
from effllm_utils.studies import registry


@pytest.fixture
def records(outputs):
    """A few attention and peft records (real record files, made-up small numbers: the report only draws them)."""
    for tech, ppl, amu, al in (("mqa", 400.0, 1.0, 0.20), ("gqa", 410.0, 1.01, 0.21), ("mla", 300.0, 1.1, 0.30)):
        runs.execute("attention", tech, "tiny", {"seed": 0}, lambda ppl=ppl, amu=amu, al=al: {
            "quality": {"ppl": ppl, "loss": 5.9}, "metrics": {"amu_gb": amu, "al_s": al, "tt": 1e-3 / al,
                                                              "aec_w": None, "pcu": 0.1, "params": 1e6},
            "artifacts": {"loss_curve": [6.0, 5.9]}}, scale="tiny", verbose=False)
    return outputs


def test_paper_figures_write_comparisons_and_claims(records):
    made = overview.paper_figures("tiny")
    tables = records / "tiny" / "tables"
    assert {"attention.csv", "paper_vs_ours_attention.csv", "claims.csv", "claims.tex", "claims.md"} <= \
        {p.name for p in tables.iterdir()}
    cmp = paper.comparison("tiny", "attention").set_index("technique")
    assert cmp.loc["mla", "ours: PPL"] == 300.0 and cmp.loc["mla", "paper: PPL"] == 7.79  # Table 3, 1.5B
    assert "Different scale and hardware" in (tables / "paper_vs_ours_attention.md").read_text()
    assert (made["claims"]["id"] == "mla_lowest_ppl").any()
    assert any(p.name == "pareto_al_s.png" for p in made["figures"])


def test_report_is_self_contained(records):
    index = webpage.build_report("tiny")
    page = index.read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images and all((index.parent / src).is_file() for src in images)
    assert "mla_lowest_ppl" in page and 'href="tables/claims.csv"' in page
    assert (index.parent / "tables" / "claims.csv").is_file() and "http" not in "".join(images)


def _browser():
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no Chromium here (.ci/run installs Debian's chromium package)")
def test_report_renders_in_headless_chromium(records):
    index = webpage.build_report("tiny")
    n_images = len(re.findall(r"<img ", index.read_text()))
    out = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", "--virtual-time-budget=10000", "--dump-dom", index.as_uri()],
                         capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", out.stdout)
    assert body, out.stderr[-2000:]
    # the page's own check ran after load: every image decoded, none failed
    assert f'data-images-loaded="{n_images}"' in body.group(0) and 'data-images-failed="0"' in body.group(0)
    console = [line for line in out.stderr.splitlines() if "CONSOLE" in line and index.name in line]
    assert console == []  # no error or message logged by the page
    # and a broken image is caught by the same check
    gone = sorted((index.parent / "figures").iterdir())[0].name
    (index.parent / "figures" / gone).unlink()
    uses = index.read_text().count(f'src="figures/{gone}"')  # the summary may show a study's figure again
    out = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", "--virtual-time-budget=10000", "--dump-dom", index.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert f'data-images-failed="{uses}"' in out.stdout and uses >= 1 and "image failed to load" in out.stderr


@pytest.mark.skipif(_browser() is None, reason="no Chromium here (.ci/run installs Debian's chromium package)")
def test_report_summary_renders_in_a_screenshot(records, tmp_path):
    """The page opens on its summary (study figure and verdict cards): a headless screenshot of its top is not
    blank — dark text and coloured verdicts on the white page — and the cards and sortable headers are in the DOM."""
    import matplotlib.image as mpimg

    index = webpage.build_report("tiny")
    shot = tmp_path / "top.png"
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,900", f"--screenshot={shot}", "--virtual-time-budget=10000", index.as_uri()],
                   capture_output=True, text=True, timeout=120)
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (900, 1200)
    dark = (img.mean(axis=2) < 0.5).mean()  # text
    coloured = (img.max(axis=2) - img.min(axis=2) > 0.08).mean()  # verdict colours, the figure
    assert 0.005 < dark < 0.5 and coloured > 0.002, (dark, coloured)
    page = index.read_text()
    assert page.index('id="summary"') < page.index('id="claims"') and page.count('class="card"') >= 3
    assert 'class="forest"' in page or "x [" not in page  # a forest plot wherever an effect has an interval


def test_forest_plot_and_cards_from_the_claims_table():
    import pandas as pd

    svg = webpage.forest("ppl mla/gqa 0.913x [0.824, 1.01]; amu_gb mqa/gqa 1.02x [0.924, 1.12]")
    assert svg.startswith('<svg class="forest"') and svg.count("<circle") == 2 and "0.913x [0.824, 1.01]" in svg
    assert webpage.forest("memory_bytes int4/bf16 0.46x") == "" and webpage.forest("") == ""
    claims = pd.DataFrame([{"study": "attention", "claim": "MLA lowest PPL", "group": "tiny", "verdict": "inconclusive",
                            "evidence level": "smoke: 1.8M params", "effect": "ppl mla/gqa 0.913x [0.824, 1.01]"}])
    html_ = webpage.summary(claims, [], lambda p: "")
    assert '<h3>attention</h3>' in html_ and 'class="verdict v-inconclusive"' in html_ and "<svg" in html_


def test_report_warns_when_records_were_made_with_other_package_versions(records):
    assert "Package versions differ" not in webpage.build_report("tiny").read_text()  # all made by this install
    folder = records / "tiny" / "runs" / "attention"
    path = next(folder.glob("attention--mla--*.json"))
    rec = runs.read_record(path)
    rec.environment["transformers_version"] = "5.23.0"
    runs.write_record(rec)
    drift = provenance.package_drift(registry.current("tiny", "attention"))
    assert len(drift) == 1 and drift[0].startswith("transformers: records made with 5.23.0 (1 record), ")
    assert "(2 records); this install has " in drift[0]
    page = webpage.build_report("tiny").read_text()
    assert "Package versions differ" in page and "transformers: records made with 5.23.0" in page


def test_the_batch_report_reuses_what_paper_figures_just_drew(outputs, monkeypatch):
    """The paper_figures notebook builds the report from its own result (`made`): no second drawing of every
    figure; `make reproduce` then prints the report's path."""
    from effllm_utils.report import overview, webpage

    made = overview.paper_figures("tiny")
    monkeypatch.setattr(webpage, "paper_figures", lambda *a, **k: (_ for _ in ()).throw(AssertionError("redrawn")))
    path = webpage.build_report("tiny", made=made)
    assert path == outputs / "tiny" / "report" / "index.html" and "Claims check" in path.read_text()
    from effllm_utils import repo_root

    assert "webpage.build_report(profile, alpha=alpha, made=made)" in (
        repo_root() / "notebooks" / "paper_figures.ipynb").read_text()


def _executed_notebook(path):
    """A small executed notebook as `make reproduce` leaves one: a printed line and a PNG figure."""
    import base64
    import io

    import matplotlib.pyplot as plt
    import nbformat

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([1, 2, 3])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    cell = nbformat.v4.new_code_cell("print('trained mqa')", execution_count=1, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="trained mqa: ppl 400.0\n"),
        nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(buf.getvalue()).decode()})])
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Attention"), cell])
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def test_report_links_the_executed_notebooks_and_states_the_environment(records):
    nbs = records / "tiny" / "notebooks"
    _executed_notebook(nbs / "attention.ipynb")
    _executed_notebook(nbs / ".paper_figures.partial.ipynb")  # still running: not listed
    (nbs / "broken.ipynb").write_text("{not json")
    index = webpage.build_report("tiny")
    page = index.read_text()
    assert '<a href="notebooks/attention.html">attention</a>' in page and "paper_figures" not in page.split(
        'id="notebooks"')[1].split("</ul>")[0]
    assert "<li>broken: not converted: " in page  # one line, the report still built
    nb_page = (index.parent / "notebooks" / "attention.html").read_text()
    assert "trained mqa: ppl 400.0" in nb_page and 'src="data:image/png;base64,' in nb_page
    assert "<script" not in nb_page and not re.search(r'(src|href)="https?:', nb_page)  # opens from disk, offline
    env = page.split('id="environment"')[1]
    assert f"<td>torch</td><td>{provenance.environment()['torch_version']}</td>" in env and "git_sha" in env
    if _browser():
        out = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                              "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                              (index.parent / "notebooks" / "attention.html").as_uri()],
                             capture_output=True, text=True, timeout=120)
        assert "trained mqa" in out.stdout and not [ln for ln in out.stderr.splitlines() if "CONSOLE" in ln]


def test_a_study_is_drawn_again_only_when_its_records_or_the_report_code_changed(records, monkeypatch):
    from effllm_utils.report import views

    drawn = []
    real = views.pretraining_figures
    monkeypatch.setattr(views, "pretraining_figures", lambda p, s: drawn.append(s) or real(p, s))
    first = views.figures("tiny", "attention")
    assert drawn == ["attention"] and first and all(p.is_file() for p in first)
    assert views.figures("tiny", "attention") == first and drawn == ["attention"]  # paper_figures: a lookup
    runs.execute("attention", "mha", "tiny", {"seed": 0}, lambda: {  # a new record: drawn again
        "quality": {"ppl": 420.0, "loss": 6.0}, "metrics": {"amu_gb": 1.2, "al_s": 0.2, "tt": 5e-3, "aec_w": None,
                                                            "pcu": 0.1, "params": 1e6},
        "artifacts": {"loss_curve": [6.1, 6.0]}}, scale="tiny", verbose=False)
    assert "mha" in views.figures("tiny", "attention")[0].read_text() and drawn == ["attention"] * 2
    first[-1].unlink()  # a figure gone: drawn again
    views.figures("tiny", "attention")
    assert drawn == ["attention"] * 3 and first[-1].is_file()
    monkeypatch.setenv("EFFLLM_PAPER_FIGURES", "1")  # make figures: the paper-width copies too
    views.figures("tiny", "attention")
    assert drawn == ["attention"] * 4


def test_the_report_flags_a_best_learning_rate_at_the_edge_of_its_sweep(outputs):
    """A technique whose sweep's best LR is the grid's smallest or largest may be compared below its best: the
    report says which (one inside the grid, or without a sweep, is not flagged)."""
    def rec(technique, best, values):
        p = {"seed": 0, "lr": best, "lr_sweep": [3, 3.0, 1000]}
        r = runs.RunRecord(run_id=runs.make_run_id("attention", technique, p, "tiny"), study="attention",
                           technique=technique, profile="tiny", scale="tiny", params=p, quality={"ppl": 100.0},
                           started_at="2026-12-06T22:00:00+00:00", code_version=provenance.code_version("attention"))
        if values:
            r.artifacts = {"lr_sweep": {"metric": "ppl", "values": values, "best": best, "seed": 1000}}
        runs.write_record(r)

    rec("gqa", 0.003, {"0.001": 120.0, "0.003": 110.0, "0.009": 115.0})  # inside: fine
    rec("mla", 0.009, {"0.001": 130.0, "0.003": 120.0, "0.009": 112.0})  # the largest tried
    # a real grid's keys are its LRs to 6 digits (engine.sweep), the best its full float: lr/3 of 0.001
    from effllm_utils.engine.sweep import lr_grid

    grid = lr_grid(0.001, 3, 3.0)
    rec("nsa", grid[0], dict(zip((f"{lr:.6g}" for lr in grid), (118.0, None, None))))  # the others diverged
    rec("mqa", 0.003, {})  # no sweep
    edges = webpage.sweep_edges(registry.current("tiny", "attention"))
    assert edges == ["attention mla at tiny: best LR 0.009 is the largest its sweep tried (0.001-0.009)",
                     "attention nsa at tiny: best LR 0.000333 is the smallest its sweep tried (0.000333-0.003)"]
    page = webpage._warnings("tiny", ["attention"])
    assert "Best learning rate at the edge of its sweep" in page and "attention mla at tiny: best LR 0.009" in page


def test_the_report_names_each_copied_run_once_with_its_count(outputs):
    """Records that are another study's run (`same_run_as`: the default backbone trained once) are listed per
    study and technique with the run they copy and how many records copy it, not one entry per record."""
    def rec(study, technique, seed, donor=None):
        p = {"seed": seed}
        r = runs.RunRecord(run_id=runs.make_run_id(study, technique, p, "tiny"), study=study, technique=technique,
                           profile="tiny", scale="tiny", params=p, quality={"ppl": 100.0 + seed},
                           started_at="2026-12-07T10:00:00+00:00", code_version=provenance.code_version(study))
        if donor:
            r.artifacts = {"same_run_as": donor.run_id, "same_run_started": donor.started_at}
        runs.write_record(r)
        return r

    gqa = [rec("attention", "gqa", seed) for seed in (0, 1, 2)]
    for g in gqa:
        rec("positional_encoding", "rope", g.params["seed"], donor=g)
    rec("moe", "dense", 0, donor=gqa[0])
    current = [r for s in ("attention", "positional_encoding", "moe") for r in registry.current("tiny", s)]
    assert webpage.copied_runs(current) == ["moe dense = attention gqa (1 record)",
                                            "positional_encoding rope = attention gqa (3 records)"]
    page = webpage._warnings("tiny", ["attention", "positional_encoding", "moe"])
    assert "positional_encoding rope = attention gqa (3 records)" in page and page.count("rope =") == 1
    assert webpage.copied_runs(gqa) == []
    [dense] = registry.current("tiny", "moe")  # a copied run flagged at its sweep's edge says whose run it is
    dense.artifacts["lr_sweep"] = {"metric": "ppl", "values": {"0.001": 120.0, "0.003": 121.0}, "best": 0.001}
    assert webpage.sweep_edges([dense]) == ["moe dense at tiny: best LR 0.001 is the smallest its sweep tried "
                                            "(0.001-0.003) (the run of attention gqa)"]


def test_report_time_sums_the_current_records_of_a_batch_run_in_several_sittings(outputs, capsys):
    """`cli.report --time`: per study, this code's records (a stale one left out), their summed run time, first and
    last start, and a total; without records, one line and exit 2."""
    from effllm_utils.cli import report as report_cli

    assert report_cli.main(["--profile", "tiny", "--time"]) == 2
    assert "no records for profile 'tiny'" in capsys.readouterr().err

    def rec(study, technique, started, seconds, status="ok", version=None):
        p = {"seed": 0, "n": technique}
        r = runs.RunRecord(run_id=runs.make_run_id(study, technique, p, "s"), study=study, technique=technique,
                           profile="tiny", scale="s", params=p, status=status, started_at=started,
                           duration_s=seconds, code_version=version or provenance.code_version(study))
        runs.write_record(r)

    rec("attention", "gqa", "2026-12-06T22:00:00+00:00", 1800.0)
    rec("attention", "mla", "2026-12-07T09:00:00+00:00", 1800.0, status="failed")  # the next sitting
    rec("attention", "mqa", "2026-12-05T09:00:00+00:00", 9999.0, version="00000000")  # stale: not counted
    rec("moe", "dense", "2026-12-06T23:00:00+00:00", 3600.0)
    t = report_cli.time_table("tiny")
    assert t.to_dict("records") == [
        {"study": "attention", "ok": 1, "failed": 1, "hours": 1.0, "first": "2026-12-06T22:00:00+00:00",
         "last": "2026-12-07T09:00:00+00:00"},
        {"study": "moe", "ok": 1, "failed": 0, "hours": 1.0, "first": "2026-12-06T23:00:00+00:00",
         "last": "2026-12-06T23:00:00+00:00"},
        {"study": "total", "ok": 2, "failed": 1, "hours": 2.0, "first": "2026-12-06T22:00:00+00:00",
         "last": "2026-12-07T09:00:00+00:00"}]
    assert report_cli.main(["--profile", "tiny", "--time"]) == 0
    assert "total   2       1   2.00" in capsys.readouterr().out
