"""The paper's published values (reference/efficientllm_paper_values): the one reader of its CSVs, and our
measurements beside them (different scale and hardware: orderings are comparable, values are not).
"""
from __future__ import annotations

from effllm_utils.core import aggregate
from effllm_utils.measure.metrics import header
from effllm_utils.studies import registry

def read_csv(file: str):
    """One of the paper's value tables (reference/efficientllm_paper_values/<file>) as a DataFrame: the one reader."""
    import pandas as pd

    from effllm_utils import repo_root

    return pd.read_csv(repo_root() / "reference" / "efficientllm_paper_values" / file, keep_default_na=False,
                       na_values=[""])


def paper_values(study: str):
    """The paper's rows of a study (its registry entry's `paper`) as {technique: {metric: value}} and a description
    of the rows."""
    import pandas as pd

    rows = registry.get(study).paper
    df = read_csv(rows.file)
    for k, v in rows.where.items():
        df = df[df[k].astype(str) == v]
    out = {}
    for _, row in df.iterrows():
        name = row[rows.column]
        if name in rows.names and rows.names[name] not in out:
            out[rows.names[name]] = {m: float(row[c]) for m, c in rows.metrics.items() if pd.notna(row.get(c))}
    return out, rows.what


def first_group(study: str, recs: list) -> list:
    """The records of the first (scale, grouping params) group, in order: one group per comparison or panel."""
    group_by = registry.get(study).group_by
    return [r for r in recs if aggregate.group(r, group_by) == aggregate.group(recs[0], group_by)] if recs else []


def comparison(profile: str, study: str):
    """Our measurement beside the paper's, one row per technique we ran (first scale / dataset group of each)."""
    import pandas as pd

    entry = registry.get(study)
    recs = first_group(study, [r for r in registry.summary(profile, study) if entry.is_main_part(r)])
    if not recs or entry.paper is None:
        return pd.DataFrame()
    paper, what = paper_values(study)
    group = " / ".join(str(v) for v in [recs[0].scale] + [recs[0].params.get(k) for k in entry.group_by] if v)
    rows = []
    for r in recs:
        row = {"technique": r.technique}
        for m in entry.paper.metrics:
            ours = r.metrics.get(m, r.quality.get(m))
            row[f"ours: {header(m)}"] = ours
            row[f"paper: {header(m)}"] = paper.get(r.technique, {}).get(m)
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["caption"] = (f"ours: {profile} profile, {group}, {recs[0].environment.get('device_name', '?')}; "
                           f"paper: {what}, H100/GH200 clusters. "
                           "Different scale and hardware: compare orderings, not values.")
    return df.dropna(axis=1, how="all")
