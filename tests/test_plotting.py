import matplotlib.pyplot as plt
import numpy as np
import pytest

from effllm_utils.report import plots as plotting


def _figure():
    plotting.use_style()
    fig, ax = plt.subplots()
    plotting.bar(ax, ["mha", "gqa", "mqa"], [3.0, 2.0, 1.0], "AMU (GB)")
    return fig


def test_savefig_writes_deterministic_pdf_png_svg_with_truetype(outputs):
    paths = plotting.savefig(_figure(), "demo", "tiny")
    assert [p.suffix for p in paths] == [".pdf", ".png", ".svg"]
    assert all(p.parent == outputs / "tiny" / "figures" for p in paths)
    pdf = paths[0].read_bytes()
    assert b"/FontFile2" in pdf and b"/Type3" not in pdf  # embedded TrueType, not Type 3
    assert b"CreationDate" not in pdf
    first = {p.suffix: p.read_bytes() for p in paths}
    plotting.savefig(_figure(), "demo", "tiny")
    assert {p.suffix: p.read_bytes() for p in paths} == first  # same figure, same bytes
    with pytest.raises(ValueError, match="unknown figure format 'jpg'"):
        plotting.savefig(_figure(), "demo", "tiny", formats=("jpg",))


def test_technique_colours_fixed_and_distinct_within_a_study():
    for group in plotting._GROUPS:
        colours = [plotting.technique_color(t) for t in group]
        assert len(set(colours)) == len(colours), group
    assert plotting.technique_color("my_new_method") == plotting.technique_color("my_new_method")
    assert plotting.technique_color("lora") == plotting.TECHNIQUE_COLORS["lora"]


def test_pareto_front():
    # (latency, loss): b dominates c; a and b trade off; d is dominated by a
    x, y = [1, 2, 3, 1.5], [5, 3, 4, 6]
    assert plotting.pareto_front(x, y) == [0, 1]
    assert plotting.pareto_front([1, 2], [1, 2], y_better="higher") == [0, 1]


def test_pareto_labels_of_coinciding_points_do_not_overlap():
    fig, ax = plt.subplots()
    # the tiny quantization table's points: fp16 and bf16 coincide at this scale of the axes
    plotting.pareto(ax, ["fp32", "fp16", "bf16", "int4_rtn"], [7.16, 3.58, 3.58, 2.56], [89.381, 89.379, 89.377, 89.56],
                    "MB", "PPL")
    offsets = {a.get_text(): tuple(map(int, a.xyann)) for a in ax.texts}
    assert offsets == {"fp32": (4, 3), "fp16": (4, 3), "bf16": (4, -6), "int4_rtn": (4, 3)}


def test_pareto_draws_error_bars_where_repeats_give_them():
    fig, ax = plt.subplots()
    plotting.pareto(ax, ["lora", "dora", "full"], [1.0, 2.0, 3.0], [5.0, 4.0, 3.0], "AL", "loss",
                    y_errors=[0.5, None, float("nan")])
    bars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert len(bars) == 1  # only the point with a standard error
    (segment,) = bars[0].lines[2][0].get_segments()
    assert np.allclose(segment, [[1.0, 4.5], [1.0, 5.5]])  # +- the given half-width around (1, 5)


def test_the_interval_of_averaged_repeats_is_the_t_interval_of_the_raw_values():
    import statistics

    values = [3.1, 2.9, 3.6]
    lo, hi = plotting.t_interval(values)
    half = plotting.t_half(statistics.stdev(values) / np.sqrt(3), 3)
    assert half == pytest.approx((hi - lo) / 2) and half == pytest.approx(4.3027 * statistics.stdev(values) / 3 ** 0.5,
                                                                          rel=1e-4)
    assert plotting.t_half(None, 3) is None and plotting.t_half(0.2, 1) is None and plotting.t_half(float("nan"), 3) \
        is None


def test_radar_normalises_each_metric(outputs):
    fig = plt.figure()
    ax = fig.add_subplot(projection="polar")
    table = {"mha": {"amu_gb": 10, "al_s": 1.0}, "mqa": {"amu_gb": 5, "al_s": 2.0}}
    plotting.radar(ax, table, ["amu_gb", "al_s"])
    lines = {l.get_label(): l.get_ydata() for l in ax.get_lines()}
    assert np.allclose(lines["mha"][:2], [0.1, 1.0]) and np.allclose(lines["mqa"][:2], [1.0, 0.1])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["AMU", "AL"]  # the paper's names, not record keys
    plotting.radar(ax, table, ["amu_gb", "al_s"], labels=["memory", "latency"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["memory", "latency"]


def test_seaborn_draws_bars_and_bands_from_the_raw_repeats(tmp_path):
    """One row per run (the repeats, not their means); bars at the mean with a 95% interval over the seeds, curves
    with a band over the seeds; the same figure gives the same bytes."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    from effllm_utils.core.runs import RunRecord
    from effllm_utils.report import plots

    def rec(t, seed, ppl):
        return RunRecord(run_id=f"{t}{seed}", study="attention", technique=t, profile="tiny", scale="s",
                         params={"seed": seed}, quality={"ppl": ppl},
                         artifacts={"loss_curve": [5.0 - 0.1 * i + 0.05 * seed for i in range(10)]})

    recs = [rec(t, s, base + s) for t, base in (("gqa", 100.0), ("mla", 90.0)) for s in range(3)]
    df = plots.tidy(recs, ["ppl"])
    assert len(df) == 6 and list(df.columns) == ["technique", "scale", "seed", "ppl"]
    plots.use_style()
    outputs = []
    for _ in range(2):
        fig, (a, b) = plt.subplots(1, 2)
        plots.bars_with_ci(a, recs, "ppl", "PPL")
        plots.seed_bands(b, recs, "loss")
        assert [round(p.get_height(), 6) for p in a.patches] == [101.0, 91.0]  # the means over the seeds
        assert len(a.lines) >= 2 and any(isinstance(c, PolyCollection) for c in b.collections)  # CIs, bands
        outputs.append(plots.savefig(fig, "seaborn_check", "tiny", formats=("png",), directory=tmp_path)[0]
                       .read_bytes())
        plt.close(fig)
    assert outputs[0] == outputs[1]


def test_make_figures_writes_paper_column_widths_with_embedded_fonts(tmp_path, monkeypatch):
    """With EFFLLM_PAPER_FIGURES=1 (make figures) every figure is also a PDF at double-column width, and a
    one-panel figure at single-column width: page sizes in points, TrueType fonts embedded; the figure keeps its
    own size."""
    import re

    from effllm_utils.report import plots

    monkeypatch.setenv(plots.PAPER_ENV, "1")
    one, ax = plt.subplots(figsize=(6.0, 3.0))
    ax.plot([1, 2, 3], [3, 1, 2])
    ax.set_title("one panel")
    plots.savefig(one, "one", "tiny", formats=("png",), directory=tmp_path)
    two, _ = plt.subplots(1, 2, figsize=(10.0, 4.0))
    plots.savefig(two, "two", "tiny", formats=("png",), directory=tmp_path)
    paper = tmp_path / "paper"
    assert sorted(p.name for p in paper.iterdir()) == ["one_double.pdf", "one_single.pdf", "two_double.pdf"]

    def page(path):
        box = re.search(rb"/MediaBox \[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", path.read_bytes())
        return float(box.group(1)), float(box.group(2))

    assert page(paper / "one_single.pdf") == pytest.approx((3.5 * 72, 1.75 * 72), abs=0.5)
    assert page(paper / "two_double.pdf") == pytest.approx((7.16 * 72, 7.16 * 0.4 * 72), abs=0.5)
    assert b"/FontFile2" in (paper / "one_single.pdf").read_bytes()  # TrueType embedded
    assert tuple(one.get_size_inches()) == (6.0, 3.0)
    monkeypatch.delenv(plots.PAPER_ENV)
    plots.savefig(one, "three", "tiny", formats=("png",), directory=tmp_path)
    assert not (paper / "three_double.pdf").exists()


def test_error_bars_are_student_t_intervals_of_the_seed_means():
    from effllm_utils.report import plots

    lo, hi = plots.t_interval([1.0, 2.0, 3.0])
    assert (lo + hi) / 2 == pytest.approx(2.0) and (hi - lo) / 2 == pytest.approx(4.3027 / 3 ** 0.5, rel=1e-4)
    assert plots.t_interval([5.0]) == (5.0, 5.0)
