"""Run one study's measurements in this process, without its notebook: what `torchrun` or `accelerate launch` start
on every rank for multi-GPU pretraining or full fine-tuning (the `paper` profile). Figures and tables come after,
from the records, with `make figures` (or the study's notebook, which then skips every recorded run).

    python -m effllm_utils.cli.study --profile tiny --study attention --set steps=20
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m effllm_utils.cli.study --profile paper \\
        --study attention

The params are the notebook's defaults with params/<profile>/<study>.yaml and `--set` applied, checked as the batch
runner checks them. Under several processes every rank trains its share of each global batch (engine/train.py) and
only rank 0 writes records (core/runs.py). Prints one line per record; exit status 1 if any failed, 2 for bad input.
"""
from __future__ import annotations

import argparse
import sys

from effllm_utils import PROFILES, check_profile
from effllm_utils.core.params import ParamsError, effective, parse_overrides, study_params, with_overrides
from effllm_utils.studies import registry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effllm_utils.cli.study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="tiny", help=f"one of {', '.join(PROFILES)}")
    ap.add_argument("--study", required=True, help="a study with a run function (not hardware or paper_figures)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a parameter for this run (VALUE as YAML); repeatable")
    ap.add_argument("--force", action="store_true", help="re-run techniques whose records exist")
    args = ap.parse_args(argv)
    try:
        check_profile(args.profile)
        registry.get(args.study)  # an unknown study: one line naming the known ones
        values = with_overrides(args.study, study_params(args.study, args.profile), parse_overrides(args.overrides))
        P = effective(args.study, values)
        registry.check(args.study, P)
        records = registry.run(args.study, args.profile, P, force=args.force)
    except (ValueError, ParamsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in records:
        print(f"{r.run_id}: {r.status}" + (f" ({r.error})" if r.error else ""))
    return 1 if any(r.status != "ok" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
