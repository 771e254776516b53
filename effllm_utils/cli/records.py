"""Keep a profile's run records in the repository and bring them back: `make save-records` / `make restore-records`.

    python -m effllm_utils.cli.records save --profile small      # outputs/small/runs -> results/small/runs
    python -m effllm_utils.cli.records restore --profile small   # results/small/runs -> outputs/small/runs

A batch that outlives one sitting (`small`: hours on 2 cores) resumes from its records, and the records are the
evidence the README's conclusions cite; outputs/ ($EFFLLM_OUTPUTS) is generated and not committed,
results/<profile>/runs/ is meant to be (`git add results/<profile>/runs` after a save). `save` copies the records of
this checkout's code (run it from the checkout that runs the batch: records of other code would only be re-measured,
so they are left out, and a save that finds no current record at all is refused), never replaces a saved ok record
with a failed one, and drops a study's saved records of older code once a record of its current code is saved.
`restore` copies the saved records that outputs/ lacks or holds only as failed; then `make reproduce
PROFILE=<profile>` resumes after them and `make report PROFILE=<profile>` reads them. Checkpoints are not kept: a
resumed batch retrains a shared base (the PEFT base, the DiT) where a remaining run needs it. Every file is read as a
record before anything is written (a malformed or misplaced one stops the command with one line naming it), and
each is written atomically. Records keep the host they were measured on (`environment`: `device_name`, `cpu_count`,
`hostname`): resuming on other hardware mixes machines in one table, so `restore` warns when the host differs.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from collections import Counter
from pathlib import Path

from effllm_utils import PROFILES, repo_root
from effllm_utils.core import provenance, runs
from effllm_utils.studies import registry


def saved_dir(profile: str) -> Path:
    """results/<profile>/runs in the repository (committed), beside the generated outputs/<profile>/runs."""
    return repo_root() / "results" / profile / "runs"


def _records(base: Path, profile: str) -> dict[Path, tuple[runs.RunRecord, str]]:
    """{path relative to base: (record, its text)} for every record file under base/<study>/; ValueError (one line
    naming the file) for a file that is not a record of `profile` stored under its own study and run id."""
    out = {}
    for p in sorted(base.glob("*/*.json")) if base.is_dir() else []:
        try:
            text = p.read_text()
            rec = runs.RunRecord.from_json(text, source=str(p))
        except ValueError as e:  # names the file already
            raise ValueError(f"{e}; delete or fix it") from None
        except (OSError, UnicodeError) as e:
            raise ValueError(f"{p}: unreadable ({type(e).__name__}: {e}); delete or fix it") from None
        rel = p.relative_to(base)
        if rec.study not in registry.names():
            raise ValueError(f"{p}: a record of unknown study {rec.study!r} (studies: {', '.join(registry.names())});"
                             f" delete it")
        if rel != Path(rec.study) / f"{rec.run_id}.json" or rec.profile != profile:
            raise ValueError(f"{p}: holds run {rec.study}/{rec.run_id} of profile {rec.profile!r}, not a "
                             f"{profile!r} record at this path; move or delete it")
        out[rel] = (rec, text)
    return out


def _current(rec: runs.RunRecord) -> bool:
    return rec.code_version == provenance.code_version(rec.study)


def save(profile: str) -> dict[str, int]:
    """Copy the current code's records of `profile` into results/; drop saved ones of older code where their study
    has a current one. {saved, kept_ok (a failed run not saved over an ok one), left_out (older code), removed}."""
    src, dst = runs.runs_dir(profile), saved_dir(profile)
    found, saved = _records(src, profile), _records(dst, profile)  # both read before anything is written
    if not found:
        raise ValueError(f"no records under {src}; set EFFLLM_OUTPUTS to the folder the batch writes "
                         f"(e.g. EFFLLM_OUTPUTS=/path/to/outputs make save-records PROFILE={profile})")
    current = {rel: rt for rel, rt in found.items() if _current(rt[0])}
    if not current:
        versions = sorted({f"{r.study} {r.code_version}" for r, _ in found.values()})
        raise ValueError(f"none of the {len(found)} records under {src} is of this checkout's code "
                         f"({', '.join(versions[:3])}{' ...' if len(versions) > 3 else ''}); run the save from the "
                         f"checkout that runs the batch")
    n = Counter()
    for rel, (rec, text) in current.items():
        old = saved.get(rel)
        if rec.status != "ok" and old is not None and old[0].status == "ok":
            n["kept_ok"] += 1
            continue
        runs.atomic_write_text(dst / rel, text)
        n["saved"] += 1
    n["left_out"] = len(found) - len(current)
    studies_now = {rec.study for rec, _ in current.values()}
    for rel, (rec, _) in saved.items():
        if rel not in current and rec.study in studies_now and not _current(rec):
            (dst / rel).unlink()
            n["removed"] += 1
    return {k: n[k] for k in ("saved", "kept_ok", "left_out", "removed")}


def restore(profile: str) -> dict[str, int]:
    """Copy the saved records of `profile` that outputs/ lacks or holds as failed. {restored, kept (outputs/ has it),
    stale (restored, of older code), other_host (restored, measured on another host)}."""
    src, dst = saved_dir(profile), runs.runs_dir(profile)
    if not src.is_dir():
        raise ValueError(f"no saved records for profile {profile!r} under {src}; "
                         f"`make save-records PROFILE={profile}` saves them")
    saved, there = _records(src, profile), _records(dst, profile)
    n = Counter()
    for rel, (rec, text) in saved.items():
        mine = there.get(rel)
        if mine is not None and not (mine[0].status != "ok" and rec.status == "ok"):
            n["kept"] += 1
            continue
        runs.atomic_write_text(dst / rel, text)
        n["restored"] += 1
        n["stale"] += not _current(rec)
        n["other_host"] += rec.environment.get("hostname", socket.gethostname()) != socket.gethostname()
    return {k: n[k] for k in ("restored", "kept", "stale", "other_host")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effllm_utils.cli.records", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("save", "restore"))
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "tiny"), choices=PROFILES)
    args = ap.parse_args(argv)
    src, dst = runs.runs_dir(args.profile), saved_dir(args.profile)
    try:
        if args.action == "save":
            n = save(args.profile)
            print(f"saved {n['saved']} records of this code from {src} to {dst}"
                  + (f"; kept {n['kept_ok']} saved ok records over failed reruns" if n["kept_ok"] else "")
                  + (f"; left out {n['left_out']} of other code (re-measured by make reproduce)" if n["left_out"]
                     else "")
                  + (f"; removed {n['removed']} saved records of older code" if n["removed"] else "")
                  + f" (commit them: git add {dst})")
        else:
            n = restore(args.profile)
            print(f"restored {n['restored']} records from {dst} to {src}"
                  + (f" ({n['kept']} already there, kept)" if n["kept"] else "")
                  + (f"; {n['stale']} of older code: make reproduce re-measures them" if n["stale"] else ""))
            if n["other_host"]:
                print(f"warning: {n['other_host']} restored records were measured on another host than "
                      f"{socket.gethostname()!r}: read them (make report), and resume the batch on the host that "
                      f"measured them, or its tables mix machines", file=sys.stderr)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
