"""Everything drawn from the records at once (`make figures`): each study's tables and figures (the registry's views),
the Pareto fronts across studies, the comparisons with the paper and the claims check.
"""
from __future__ import annotations

from pathlib import Path

from effllm_utils.report import views
from effllm_utils.report.paper import comparison, first_group
from effllm_utils.report.tables import write_with_caption
from effllm_utils.studies import registry


def draw(profile: str, studies: list[str] | None = None) -> dict[str, list]:
    """Every study's own tables and figures (its registry `figures` view), from records only."""
    out = {}
    for name in registry.names():
        study = registry.get(name)
        if study.figures is None or (studies and name not in studies):
            continue
        out[name] = views.figures(profile, name)  # a lookup where the study's notebook just drew them
    return out


# -- figures across studies ----------------------------------------------------------------------------------------

def pareto_fronts(profile: str) -> list[Path]:
    """Quality against energy (where measured) and against latency, one panel per study, Pareto front drawn."""
    import matplotlib.pyplot as plt

    from effllm_utils.report import plots as plotting

    panels = []
    for study in registry.names():
        entry = registry.get(study)
        q = entry.quality
        if q is None:
            continue
        recs = first_group(study, [r for r in registry.summary(profile, study) if r.quality.get(q) is not None
                                   and entry.is_main_part(r)])  # one group per panel: the first
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
                            label, q, y_errors=[plotting.record_half(r, q) for r in rs])
            ax.set_title(study, fontsize=9)
        for ax in list(axes.flat)[len(usable):]:
            ax.set_axis_off()
        missing = [s for s, _, _ in panels if s not in {u[0] for u in usable}]
        fig.suptitle(f"quality vs {label} ({profile})" + (f" — not measured for: {', '.join(missing)}" if missing
                                                             else ""), fontsize=10)
        paths += plotting.savefig(fig, f"pareto_{cost}", profile)
        plt.close(fig)
    return paths


def paper_figures(profile: str, alpha: float = 0.05) -> dict:
    """Every figure and table from the records: the studies' own, the Pareto fronts, the comparisons with the
    paper and the claims check. Returns {'figures': [...], 'tables': [...], 'claims': DataFrame}."""
    from effllm_utils.report import claims

    drawn = draw(profile)
    paths = [p for ps in drawn.values() for p in ps]
    paths += pareto_fronts(profile)
    for study in registry.names():
        df = comparison(profile, study)
        if not df.empty:
            paths += write_with_caption(df, profile, f"paper_vs_ours_{study}")
    checked = claims.evaluate(profile, alpha=alpha)
    checked.attrs["caption"] = (f"Claims check ({profile}): verdicts on our repeats (one-sided Welch tests on logs, "
                                "differences beyond a practical margin, Holm; a false claim reproduced or a true one "
                                f"contradicted at most {alpha / 2:.1%} per row; effect = ratio with its "
                                f"{1 - alpha:.0%} CI; see effllm_utils/report/claims.py) and on the paper's own "
                                "quoted numbers.")
    paths += write_with_caption(checked, profile, "claims")
    return {"figures": [p for p in paths if p.suffix == ".png"], "tables": [p for p in paths if p.suffix == ".csv"],
            "claims": checked}
