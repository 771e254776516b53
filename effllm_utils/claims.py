"""The claims check: the paper's headline claims (reference/claims.yaml) evaluated on our records and on the paper's
own numbers.

Verdicts, per claim and profile: `reproduced`, `contradicted`, `inconclusive` (the difference is within the
uncertainty), or `not testable here` (a metric this profile does not measure, a technique it did not run, a claim about
hardware or a scale it does not have). A claim holds when every one of its tests holds.

Uncertainty: where a technique has several ok records (repeated runs, e.g. other seeds), a value is their mean with
its standard error; AL of a single training run is the mean of its timed steps with the standard error over steps;
any other single measurement has no measured spread, and a difference smaller than `margin` (relative, default 5%)
is called inconclusive rather than a win. Two values differ decisively when the gap exceeds both `margin` and twice
the combined standard error.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import runs

REPRODUCED, CONTRADICTED, INCONCLUSIVE, UNTESTABLE = "reproduced", "contradicted", "inconclusive", "not testable here"
KINDS = ("best", "less", "ratio")
# our metric key -> column of the paper's value files (efficientllm_paper_values/)
PAPER_COLUMNS = {"amu_gb": "amu_gb", "al_s": "al_s_per_iter", "aec_w": "aec_w", "ppl": "ppl", "loss": "loss",
                 "tt": "tt_tokens_per_param_s", "st": "st_samples_per_param_s", "score": "avg_perf", "mcr": "mcr",
                 "it": "it_tokens_per_s", "fid": "quality"}


def claims_path() -> Path:
    from . import repo_root

    return repo_root() / "reference" / "claims.yaml"


def load_claims(path: Path | None = None) -> list[dict]:
    """The claims file, validated (unknown test kinds, missing fields and unknown studies are errors naming the
    claim)."""
    from . import STUDIES
    from .params import read_yaml

    path = Path(path or claims_path())
    doc = read_yaml(path.read_text())
    out = []
    for c in doc.get("claims", []):
        cid = c.get("id", "?")
        for key in ("id", "claim", "source", "study", "tests"):
            if key not in c:
                raise ValueError(f"{path}: claim {cid!r} has no {key!r}")
        if c["study"] not in STUDIES:
            raise ValueError(f"{path}: claim {cid!r}: unknown study {c['study']!r}")
        for t in c["tests"]:
            need = {"best": ("technique", "among", "metric", "direction"), "less": ("a", "b", "metric"),
                    "ratio": ("a", "b", "metric", "lo", "hi")}.get(t.get("kind"))
            if need is None:
                raise ValueError(f"{path}: claim {cid!r}: unknown test kind {t.get('kind')!r}; use {', '.join(KINDS)}")
            missing = [k for k in need if k not in t]
            if missing:
                raise ValueError(f"{path}: claim {cid!r}: a {t['kind']} test needs {missing}")
        out.append(c)
    return out


# -- values with uncertainty ---------------------------------------------------------------------------------------

@dataclass
class Value:
    mean: float
    se: float | None  # standard error; None = a single measurement with no measured spread
    n: int
    how: str = ""

    def __str__(self):
        return f"{self.mean:.4g}" + (f" ± {self.se:.2g}" if self.se else "") + f" ({self.how})"


def _metric(rec: runs.RunRecord, metric: str):
    v = rec.metrics.get(metric, rec.quality.get(metric))
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def value(recs: list[runs.RunRecord], metric: str) -> Value | None:
    """The metric over the records of one technique (repeats), with its uncertainty; None where unmeasured."""
    vals = [v for v in (_metric(r, metric) for r in recs) if v is not None]
    if not vals:
        return None
    if len(vals) > 1:
        return Value(float(np.mean(vals)), float(np.std(vals, ddof=1) / math.sqrt(len(vals))), len(vals),
                     f"{len(vals)} runs")
    if metric == "al_s" and len(recs) == 1:
        steps = recs[0].artifacts.get("step_s") or []
        skip = int(recs[0].params.get("skip_steps", 2)) if isinstance(recs[0].params, dict) else 2
        timed = np.asarray(steps[skip:], float)
        if len(timed) >= 5 and math.isclose(timed.mean(), vals[0], rel_tol=0.02):
            return Value(vals[0], float(timed.std(ddof=1) / math.sqrt(len(timed))), 1, f"1 run, {len(timed)} steps")
    return Value(vals[0], None, 1, "1 run")


def compare(a: Value, b: Value, margin: float) -> int:
    """-1 if a is decisively below b, +1 if above, 0 if the gap is within the uncertainty (see the module doc)."""
    gap = a.mean - b.mean
    scale = max(abs(a.mean), abs(b.mean), 1e-30)
    se = math.sqrt((a.se or 0.0) ** 2 + (b.se or 0.0) ** 2)
    if abs(gap) <= margin * scale or abs(gap) <= 2 * se:
        return 0
    return -1 if gap < 0 else 1


def _ratio(a: Value, b: Value) -> Value:
    r = a.mean / b.mean
    rel = math.sqrt(((a.se or 0) / a.mean) ** 2 + ((b.se or 0) / b.mean) ** 2) if a.mean and b.mean else 0.0
    se = abs(r) * rel if (a.se or b.se) else None
    return Value(r, se, min(a.n, b.n), "ratio")


def run_test(test: dict, values: dict[str, Value | None], margin: float) -> tuple[str, str]:
    """(verdict, evidence) of one test on {technique: Value}."""
    metric = test["metric"]

    def missing(names):
        absent = [t for t in names if values.get(t) is None]
        return (UNTESTABLE, f"{metric} not measured for {', '.join(absent)}") if absent else None

    if test["kind"] == "best":
        among = [t for t in test["among"] if t in values]
        if test["technique"] not in among or len(among) < 2:
            return UNTESTABLE, f"needs {test['technique']} and another of {test['among']} (ran: {sorted(values)})"
        if (m := missing(among)) is not None:
            return m
        sign = 1 if test["direction"] == "min" else -1
        me = values[test["technique"]]
        others = {t: compare(me, values[t], margin) * sign for t in among if t != test["technique"]}
        evidence = f"{metric}: " + ", ".join(f"{t} {values[t]}" for t in among)
        if all(v < 0 for v in others.values()):
            return REPRODUCED, evidence
        better = [t for t, v in others.items() if v > 0]
        if better:
            return CONTRADICTED, evidence + f"; better: {', '.join(better)}"
        tied = ", ".join(t for t, v in others.items() if v == 0)
        return INCONCLUSIVE, evidence + "; within the uncertainty of: " + tied
    a, b = test["a"], test["b"]
    if a not in values or b not in values:
        return UNTESTABLE, f"needs {a} and {b} (ran: {sorted(values)})"
    if (m := missing([a, b])) is not None:
        return m
    if test["kind"] == "less":
        c = compare(values[a], values[b], margin)
        evidence = f"{metric}: {a} {values[a]}, {b} {values[b]}"
        return {-1: REPRODUCED, 1: CONTRADICTED, 0: INCONCLUSIVE}[c], evidence
    r = _ratio(values[a], values[b])
    lo, hi = test["lo"], test["hi"]
    spread = max(2 * (r.se or 0.0), margin * abs(r.mean))
    evidence = f"{metric} {a}/{b} = {r.mean:.3g}" + (f" ± {r.se:.2g}" if r.se else "") + f" (claim: {lo}-{hi})"
    if lo <= r.mean - spread and r.mean + spread <= hi:
        return REPRODUCED, evidence
    if r.mean + spread < lo or r.mean - spread > hi:
        return CONTRADICTED, evidence
    return INCONCLUSIVE, evidence


def combine(verdicts: list[str]) -> str:
    if any(v == CONTRADICTED for v in verdicts):
        return CONTRADICTED
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if all(v == UNTESTABLE for v in verdicts):
        return UNTESTABLE
    return INCONCLUSIVE  # some part is within the uncertainty or could not be tested here


# -- our records ---------------------------------------------------------------------------------------------------

def _groups(recs: list[runs.RunRecord]) -> dict[str, list[runs.RunRecord]]:
    """Records compared together: one group per scale (and per dataset where the study has several)."""
    out: dict[str, list] = {}
    for r in recs:
        ds = r.params.get("dataset") if isinstance(r.params, dict) else None
        key = r.scale + (f" / {ds}" if isinstance(ds, str) and r.study in ("peft",) else "")
        out.setdefault(key, []).append(r)
    return out


def repeats(recs: list[runs.RunRecord]) -> dict[str, list[runs.RunRecord]]:
    """{technique: its repeated runs} within one group: the records `runs.current` keeps (those whose params equal,
    seed aside, the technique's newest record's) — older records of other settings are not repeats."""
    out: dict[str, list] = {}
    for r in runs.current(recs):
        out.setdefault(r.technique, []).append(r)
    return out


def _named(claim: dict) -> set[str]:
    """The techniques a claim's tests compare."""
    return {n for t in claim["tests"] for n in [*t.get("among", []), t.get("technique"), t.get("a"), t.get("b")] if n}


def _when(claim: dict, recs: list[runs.RunRecord]) -> str | None:
    """The reason a claim cannot be tested on these records, or None."""
    when = claim.get("when") or {}
    if "device" in when:
        devices = sorted({str(r.environment.get("device_name", "")) for r in recs})
        if not any(any(d in dev for d in when["device"]) for dev in devices):
            return f"needs a {' / '.join(when['device'])} GPU; these runs used {', '.join(devices) or 'unknown'}"
    if "min_params" in when:
        sizes = [_metric(r, "base_params") or _metric(r, "params") for r in recs]
        biggest = max((s for s in sizes if s), default=0)
        if biggest < float(when["min_params"]):
            return f"needs models of >= {float(when['min_params']):.3g} parameters; the largest here has {biggest:.3g}"
    return None


def evaluate(profile: str, claims: list[dict] | None = None, margin: float = 0.05):
    """One row per (claim, group of records): verdict and evidence on our records, and the paper's own numbers."""
    import pandas as pd

    claims = claims if claims is not None else load_claims()
    rows = []
    cache: dict[str, list] = {}
    for c in claims:
        if c["study"] not in cache:
            cache[c["study"]] = [r for r in runs.load_records(profile, c["study"]) if r.status == "ok"]
        recs = cache[c["study"]]
        paper_verdict, paper_evidence = paper_check(c)
        base = {"id": c["id"], "claim": c["claim"], "source": c["source"], "study": c["study"], "profile": profile,
                "paper's own numbers": paper_verdict, "paper evidence": paper_evidence}
        if not recs:
            rows.append(base | {"group": "", "verdict": UNTESTABLE, "evidence": f"no {c['study']} records yet"})
            continue
        groups = _groups(recs)
        # a group that ran none of the claim's techniques (the DiT fine-tuning methods for a DiT attention claim) is
        # not a test of it; all groups stay when none did, so the row says what is missing
        groups = {g: rs for g, rs in groups.items() if {r.technique for r in rs} & _named(c)} or groups
        for group, grecs in groups.items():
            reason = _when(c, grecs)
            if reason:
                rows.append(base | {"group": group, "verdict": UNTESTABLE, "evidence": reason})
                continue
            by_tech = repeats(grecs)
            verdicts, evidence = [], []
            for t in c["tests"]:
                vals = {tech: value(rs, t["metric"]) for tech, rs in by_tech.items()}
                v, e = run_test(t, vals, margin)
                verdicts.append(v)
                evidence.append(e)
            rows.append(base | {"group": group, "verdict": combine(verdicts), "evidence": " | ".join(evidence)})
    cols = ["id", "claim", "source", "study", "profile", "group", "verdict", "evidence", "paper's own numbers",
            "paper evidence"]
    return pd.DataFrame(rows, columns=cols)


# -- the paper's own numbers ---------------------------------------------------------------------------------------

def _params_of(name: str) -> float | None:
    m = re.search(r"(\d+(?:\.\d+)?)B\b", str(name))
    return float(m.group(1)) * 1e9 if m else None


def paper_check(claim: dict) -> tuple[str, str]:
    """The claim's tests on the paper's published values (no uncertainty: exact comparisons), over each group of
    rows; 'agree' if every group holds, 'disagree' if one fails, 'no numbers' where the values were not quoted."""
    import pandas as pd

    from . import repo_root

    spec = claim.get("paper")
    if not spec:
        return "no numbers", "no table values for this claim"
    # keep_default_na=False: the positional-encoding row named "None" is a method, not a missing value
    df = pd.read_csv(repo_root() / "reference" / "efficientllm_paper_values" / spec["file"], keep_default_na=False,
                     na_values=[""])
    for col, val in (spec.get("where") or {}).items():
        df = df[df[col].astype(str) == str(val)]
    if "min_model_params" in spec:
        df = df[df["model"].map(lambda m: (_params_of(m) or 0) >= float(spec["min_model_params"]))]
    df = df[df[spec["method_column"]].isin(list(spec["names"]))]
    columns = PAPER_COLUMNS | (spec.get("metric_columns") or {})
    results, evidence = [], []
    keys = spec.get("group_by") or []
    groups = df.groupby(keys, sort=False) if keys else [((), df)]
    for key, sub in groups:
        vals = {}
        for _, row in sub.iterrows():
            tech = spec["names"][row[spec["method_column"]]]
            vals[tech] = {m: row[c] for m, c in columns.items() if c in row and pd.notna(row[c])}
        verdicts, es = [], []
        for t in claim["tests"]:
            tv = {tech: (Value(float(v[t["metric"]]), None, 1, "paper") if t["metric"] in v else None)
                  for tech, v in vals.items()}
            v, e = run_test(t, tv, margin=0.0)
            verdicts.append(v)
            es.append(e.replace(" (paper)", ""))
        verdict = combine(verdicts)
        if verdict != UNTESTABLE:
            label = ", ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
            results.append(verdict)
            evidence.append((f"[{label}] " if label else "") + f"{verdict}: " + " | ".join(es))
    if not results:
        return "no numbers", "the quoted rows do not cover this claim's metrics"
    if all(v == REPRODUCED for v in results):
        return "agree", "; ".join(evidence)
    if any(v == CONTRADICTED for v in results):
        return "disagree", "; ".join(evidence)
    return "ties", "; ".join(evidence)
