"""`make report`: figures, tables, the claims check and the HTML report from stored records.

    python -m effllm_utils.cli.report --profile tiny            # outputs/<profile>/report/index.html
    python -m effllm_utils.cli.report --profile tiny --no-html  # the figures and tables only
"""
from __future__ import annotations

import argparse
import os
import sys

from effllm_utils import PROFILES, outputs_dir
from effllm_utils.core import runs
from effllm_utils.report.overview import paper_figures
from effllm_utils.report.webpage import build_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effllm_utils.cli.report", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "tiny"), choices=PROFILES)
    ap.add_argument("--alpha", type=float, default=0.05,
                    help="the claims check's error rate: chance of a decisive verdict where techniques do not differ")
    ap.add_argument("--no-html", action="store_true", help="figures and tables only")
    args = ap.parse_args(argv)
    if not runs.runs_dir(args.profile).is_dir():
        print(f"error: no records for profile {args.profile!r} under {runs.runs_dir(args.profile)}; run "
              f"`make reproduce PROFILE={args.profile}` first", file=sys.stderr)
        return 2
    if args.no_html:
        made = paper_figures(args.profile, args.alpha)
        print(f"{len(made['figures'])} figures, {len(made['tables'])} tables under {outputs_dir(args.profile)}")
    else:
        print(f"report: {build_report(args.profile, args.alpha)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
