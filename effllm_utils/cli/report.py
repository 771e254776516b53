"""`make report`: figures, tables, the claims check and the HTML report from stored records.

    python -m effllm_utils.cli.report --profile tiny            # outputs/<profile>/report/index.html
    python -m effllm_utils.cli.report --profile tiny --no-html  # the figures and tables only
    python -m effllm_utils.cli.report --profile small --time    # the time the current records took, per study

`--time` is how a batch that ran over several sittings (`make reproduce` resumes) states its time: the sum of the
current code's records' run times (`duration_s`; kernel start-up, figures and the report add seconds per notebook;
records of every setting tried with this code count, runs that `--force` replaced do not).
"""
from __future__ import annotations

import argparse
import os
import sys

from effllm_utils import PROFILES, outputs_dir
from effllm_utils.core import runs
from effllm_utils.report.overview import paper_figures
from effllm_utils.report.webpage import build_report


def time_table(profile: str):
    """Per study, the records of this checkout's code (stale ones left out): ok and failed runs, their summed run
    time in hours, the first and last start; a total row last."""
    import pandas as pd

    from effllm_utils.core import provenance
    from effllm_utils.studies import registry

    rows = []
    for study in registry.names():
        recs = [r for r in runs.load_records(profile, study) if r.code_version == provenance.code_version(study)]
        if recs:
            starts = sorted(r.started_at for r in recs)
            ok = sum(r.status == "ok" for r in recs)
            hours = sum(r.duration_s or 0.0 for r in recs) / 3600
            rows.append({"study": study, "ok": ok, "failed": len(recs) - ok, "hours": hours, "first": starts[0],
                         "last": starts[-1]})
    df = pd.DataFrame(rows, columns=["study", "ok", "failed", "hours", "first", "last"])
    if rows:
        df.loc[len(df)] = {"study": "total", "ok": df["ok"].sum(), "failed": df["failed"].sum(),
                           "hours": df["hours"].sum(), "first": df["first"].min(), "last": df["last"].max()}
    return df


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effllm_utils.cli.report", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "tiny"), choices=PROFILES)
    ap.add_argument("--alpha", type=float, default=0.05,
                    help="the claims check's error rate: a false claim reproduced, or a true one contradicted, at most "
                         "alpha/2 per row; the intervals are 1 - alpha")
    ap.add_argument("--no-html", action="store_true", help="figures and tables only")
    ap.add_argument("--time", action="store_true", help="print the time the current records took, per study; "
                    "draw nothing")
    args = ap.parse_args(argv)
    if not runs.runs_dir(args.profile).is_dir():
        print(f"error: no records for profile {args.profile!r} under {runs.runs_dir(args.profile)}; run "
              f"`make reproduce PROFILE={args.profile}` first", file=sys.stderr)
        return 2
    if args.time:
        t = time_table(args.profile)
        print(t.to_string(index=False, float_format=lambda h: f"{h:.2f}") if len(t) else
              f"no records of this checkout's code for profile {args.profile!r} (every record is stale): run "
              f"`make reproduce PROFILE={args.profile}`")
        return 0
    if args.no_html:
        made = paper_figures(args.profile, args.alpha)
        print(f"{len(made['figures'])} figures, {len(made['tables'])} tables under {outputs_dir(args.profile)}")
    else:
        print(f"report: {build_report(args.profile, args.alpha)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
