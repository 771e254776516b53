"""Tables as CSV, Markdown and LaTeX (booktabs rules: \\toprule, \\midrule, \\bottomrule; escaped), written
atomically under outputs/<profile>/tables/.
"""
from __future__ import annotations

from pathlib import Path

from effllm_utils import outputs_dir
from effllm_utils.core import runs


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


def write_with_caption(df, profile: str, name: str) -> list[Path]:

    paths = write_table(df, profile, name)
    if df.attrs.get("caption"):  # the Markdown carries the caption above the table
        runs.atomic_write_text(paths[1], f"{df.attrs['caption']}\n\n" + paths[1].read_text())
    return paths
