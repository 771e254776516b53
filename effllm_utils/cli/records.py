"""Keep a profile's run records in the repository and bring them back: `make save-records` / `make restore-records`.

    python -m effllm_utils.cli.records save --profile small      # outputs/small/runs -> results/small/runs
    python -m effllm_utils.cli.records restore --profile small   # results/small/runs -> outputs/small/runs

A batch that outlives one sitting (`small`: hours on 2 cores) resumes from its records, and the records are the
evidence the README's conclusions cite; outputs/ is generated and not committed, results/<profile>/runs/ is. `save`
copies the records of this checkout's code (stale ones would only be re-measured: left out) and removes saved
records whose code is no longer this checkout's; `restore` copies the saved records that outputs/ lacks (a record
already there is newer or the same run: kept), then `make reproduce PROFILE=<profile>` resumes after them and
`make report PROFILE=<profile>` reads them. Every file is read as a record before it is copied (a malformed one
stops the command with one line naming it) and written atomically. Records keep the host they were measured on
(`environment`: `device_name`, `cpu_count`, `hostname`): resuming on other hardware mixes machines in one table, so restore to read, and resume on
the host that measured them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from effllm_utils import PROFILES, repo_root
from effllm_utils.core import provenance, runs


def saved_dir(profile: str) -> Path:
    """results/<profile>/runs in the repository (committed), beside the generated outputs/<profile>/runs."""
    return repo_root() / "results" / profile / "runs"


def _records(base: Path) -> dict[Path, runs.RunRecord]:
    """{path relative to base: record} for every record file under base/<study>/ (ValueError names a bad one)."""
    out = {}
    for p in sorted(base.glob("*/*.json")) if base.is_dir() else []:
        try:
            out[p.relative_to(base)] = runs.read_record(p)
        except Exception as e:  # noqa: BLE001 - one line naming the file, whatever the parse error
            raise ValueError(f"{p} is not a run record ({type(e).__name__}: {e}); delete or fix it") from None
    return out


def save(profile: str) -> tuple[int, int]:
    """Copy the current code's records of `profile` into results/; remove saved ones of other code. (copied,
    removed)."""
    src, dst = runs.runs_dir(profile), saved_dir(profile)
    current = {rel: rec for rel, rec in _records(src).items()
               if rec.code_version == provenance.code_version(rec.study)}
    for rel in current:
        runs.atomic_write_text(dst / rel, (src / rel).read_text())
    removed = 0
    for rel, rec in _records(dst).items():
        if rel not in current and rec.code_version != provenance.code_version(rec.study):
            (dst / rel).unlink()
            removed += 1
    return len(current), removed


def restore(profile: str) -> tuple[int, int]:
    """Copy the saved records of `profile` that outputs/ lacks. (copied, already there)."""
    src, dst = saved_dir(profile), runs.runs_dir(profile)
    saved = _records(src)
    todo = [rel for rel in saved if not (dst / rel).exists()]
    for rel in todo:
        runs.atomic_write_text(dst / rel, (src / rel).read_text())
    return len(todo), len(saved) - len(todo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effllm_utils.cli.records", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("save", "restore"))
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "tiny"), choices=PROFILES)
    args = ap.parse_args(argv)
    try:
        if args.action == "save":
            copied, removed = save(args.profile)
            print(f"saved {copied} records of this code to {saved_dir(args.profile)}"
                  + (f"; removed {removed} of older code" if removed else ""))
        else:
            if not saved_dir(args.profile).is_dir():
                print(f"error: no saved records for profile {args.profile!r} under {saved_dir(args.profile)}; "
                      f"`make save-records PROFILE={args.profile}` saves them", file=sys.stderr)
                return 2
            copied, kept = restore(args.profile)
            print(f"restored {copied} records to {runs.runs_dir(args.profile)}"
                  + (f" ({kept} already there, kept)" if kept else ""))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
