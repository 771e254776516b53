"""The claims check: the paper's headline claims (reference/claims.yaml) as statistical tests on our repeats, and the
same tests on the paper's own published numbers.

Verdicts, per claim and group of records (a scale, and a dataset where the study varies it):
  reproduced      every comparison the claim makes holds, each at one-sided level ALPHA/2 (Welch's t on the logs
                  of the repeats). A claimed difference (`less`, `best`) is one beyond the metric's practical margin
                  (RULES: 2% for quality, 5% for time, memory and energy): "a is lower than b" means lower by more
                  than the margin. A claim that holds only if all its comparisons hold is an intersection-union
                  test, which keeps its error rate at ALPHA/2 without a multiplicity correction (Berger 1982).
  contradicted    some comparison is refuted: a is not below b by more than the margin (equal within it, or
                  higher), or a ratio lies outside its claimed range, with Holm's correction across every such
                  hypothesis of the claim at family-wise level ALPHA/2. A `best` claim is refuted by another
                  technique it does not beat by the margin; an exact tie for best (counted or published values) is
                  left inconclusive.
  inconclusive    neither: the data cannot tell at this number of repeats; also where a technique has fewer repeats
                  than its metric needs (MIN_RUNS: 3 seeds for a quality claim), where a technique a `best` claim
                  ranks did not run (the claim is over all of them: it cannot be reproduced on a subset), where a
                  reported seed of a compared technique failed or gave no value (a verdict on the survivors would
                  flatter the technique), where a learning rate a sweep picked within seed noise or at an end of
                  its grid could flip the quality verdict (`lr_pick_note`, `_lr_blocks`), or where the ranking a
                  quality claim relies on changed between half and all of the training budget.
  not testable    a metric this profile does not measure, a device or scale it lacks, a technique a two-technique
                  test names that did not run, a best test whose own technique (or every other) did not run.
What the rule controls, per claims row: a false claim comes out reproduced with probability at most ALPHA/2, and a
true one (a difference beyond the margin, a ratio inside its range) comes out contradicted with probability at most
ALPHA/2; an A/A world, where every technique draws from one distribution, makes every difference claim false, so
"contradicted" is there the right answer, never "reproduced". tests/test_claims.py checks both rates and the power
to find a 30% effect at 8% noise with 3 seeds. The rate is per row: claims x groups of a report are not
corrected across rows (a reader scanning all of them should expect up to ALPHA/2 x rows false decisive verdicts
in the worst case), and the J/token verdict beside a power claim is its own row-level test.

Each row states the effect (the ratio it relies on, with its 1 - ALPHA confidence interval) and the evidence level:
model size, tokens seen, tokens per parameter (fine-tuning tokens for a run that fine-tuned a pretrained checkpoint,
`evidence_level`) and seeds, and a level from EVIDENCE_LEVELS. Timing repeats are seeds run
by `make reproduce ARGS="--seeds 0,1,2"`, which runs every technique of a seed before the next seed (A B C A B C ...),
so a drift of the machine lands in the spread, not between techniques. Only the current records of each experiment
(`core.aggregate`, same settings and same code version) are repeats; records of other code are stale and left out. A
time or energy test also leaves out the runs that shared their CPUs with other work, and says which (`set_aside`).

Long by design: the claims file, the statistical rule, evidence levels and the paper's own numbers are read together
by a reviewer.
"""
from __future__ import annotations

import math
import random
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from effllm_utils.core import aggregate, provenance, runs
from effllm_utils.engine.sweep import is_sweep_point
from effllm_utils.report.stats import Diff, holm, log_diff
from effllm_utils.studies import registry

REPRODUCED, CONTRADICTED, INCONCLUSIVE, UNTESTABLE = "reproduced", "contradicted", "inconclusive", "not testable here"
KINDS = ("best", "less", "ratio", "at_least")
ALPHA = 0.05  # each wrong decisive verdict (a false claim reproduced, a true one contradicted): at most ALPHA/2


@dataclass(frozen=True)
class Rule:
    margin: float  # practical-equivalence margin: |ratio - 1| below it is "no difference that matters"
    min_runs: int  # repeats each compared technique needs before a verdict


# The statistical rule's settings per metric kind, declared in one place.
RULES = {
    "quality": Rule(margin=0.02, min_runs=3),  # perplexity, loss, FID, task score: 3 seeds
    "time": Rule(margin=0.05, min_runs=2),  # latency, throughput: repeats interleaved by --seeds
    "memory": Rule(margin=0.05, min_runs=2),  # memory in use over a run
    "energy": Rule(margin=0.05, min_runs=2),  # power, energy, J/token
    "size": Rule(margin=0.0, min_runs=1),  # counted, not measured (bytes of weights, parameters): exact
}
METRIC_KIND = {
    **dict.fromkeys(("ppl", "loss", "fid", "score", "train_loss"), "quality"),
    **dict.fromkeys(("al_s", "it", "tt", "st", "tokens_per_s", "prefill_s", "samples_per_s"), "time"),
    **dict.fromkeys(("amu_gb", "peak_mem_gb"), "memory"),
    **dict.fromkeys(("aec_w", "energy_j", "j_per_token"), "energy"),
    **dict.fromkeys(("memory_bytes", "disk_bytes", "params", "flops_per_token", "kv_bytes_per_token"), "size"),
}
HIGHER_IS_BETTER = {"score"}  # quality metrics where more is better (the rest: perplexity, loss, FID)
# Evidence levels, most demanding first: (name, min parameters, min tokens per parameter for trained models).
# 20 tokens per parameter is the compute-optimal budget of Hoffmann et al. (2022).
EVIDENCE_LEVELS = (("paper-scale", 5e8, 20.0), ("small-scale", 1e8, 1.0), ("cpu-scale", 1e6, 0.25), ("smoke", 0.0, 0.0))
# our metric key -> column of the paper's value files (efficientllm_paper_values/)
PAPER_COLUMNS = {"amu_gb": "amu_gb", "al_s": "al_s_per_iter", "aec_w": "aec_w", "ppl": "ppl", "loss": "loss",
                 "tt": "tt_tokens_per_param_s", "st": "st_samples_per_param_s", "score": "avg_perf", "mcr": "mcr",
                 "it": "it_tokens_per_s", "fid": "quality"}


def rule(metric: str) -> Rule:
    return RULES[METRIC_KIND.get(metric, "quality")]


# -- the claims file -----------------------------------------------------------------------------------------------

def claims_path() -> Path:
    from effllm_utils import repo_root

    return repo_root() / "reference" / "claims.yaml"


_NEEDS = {"best": ("technique", "among", "metric", "direction"), "less": ("a", "b", "metric"),
          "ratio": ("a", "b", "metric", "lo", "hi"), "at_least": ("a", "b", "metric", "ratio")}


def load_claims(path: Path | None = None) -> list[dict]:
    """The claims file, validated: unknown test kinds, missing fields, unknown studies, and a test that could never
    be reproduced or never contradicted (`reachable`) are errors naming the claim."""
    from effllm_utils.core.params import read_yaml

    path = Path(path or claims_path())
    doc = read_yaml(path.read_text())
    out = []
    for c in doc.get("claims", []):
        cid = c.get("id", "?")
        for key in ("id", "claim", "source", "study", "tests"):
            if key not in c:
                raise ValueError(f"{path}: claim {cid!r} has no {key!r}")
        if c["study"] not in registry.names():
            raise ValueError(f"{path}: claim {cid!r}: unknown study {c['study']!r}")
        scale = c.get("scale")
        if scale is not None:
            p = scale.get("params") if isinstance(scale, dict) else None
            ok = (isinstance(p, (int, float)) or (isinstance(p, list) and len(p) == 2
                                                  and all(isinstance(x, (int, float)) for x in p) and p[0] <= p[1]))
            if not ok or not set(scale) <= {"params", "tokens"} or not isinstance(scale.get("tokens", 0), (int, float)):
                raise ValueError(f"{path}: claim {cid!r}: scale must be {{params: N or [smallest, largest], "
                                 f"tokens: N (optional)}}, got {scale!r}")
        for t in c["tests"]:
            need = _NEEDS.get(t.get("kind"))
            if need is None:
                raise ValueError(f"{path}: claim {cid!r}: unknown test kind {t.get('kind')!r}; use {', '.join(KINDS)}")
            missing = [k for k in need if k not in t]
            if missing:
                raise ValueError(f"{path}: claim {cid!r}: a {t['kind']} test needs {missing}")
            problem = reachable(t)
            if problem:
                raise ValueError(f"{path}: claim {cid!r}: {problem}")
        out.append(c)
    return out


def synthetic(test: dict, holds: bool, n: int = 5, noise: float = 0.005) -> dict[str, list[float]]:
    """Repeats of every technique a test names, made so the test's claim clearly holds (or clearly fails): the
    evidence that a test can reach both verdicts."""
    rng = random.Random(0)

    def reps(x):
        return [x * (1 + noise * rng.uniform(-1, 1)) for _ in range(n)]

    kind = test["kind"]
    if kind == "less":
        return {test["a"]: reps(1.0 if holds else 2.0), test["b"]: reps(2.0 if holds else 1.0)}
    if kind == "best":
        good, bad = (1.0, 2.0) if test["direction"] == "min" else (2.0, 1.0)
        return {t: reps(good if (t == test["technique"]) == holds else bad) for t in test["among"]}
    if kind == "ratio":
        target = math.sqrt(test["lo"] * test["hi"]) if holds else test["hi"] * 2
        return {test["a"]: reps(target), test["b"]: reps(1.0)}
    return {test["a"]: reps(test["ratio"] * (1.5 if holds else 0.5)), test["b"]: reps(1.0)}  # at_least


def reachable(test: dict) -> str | None:
    """Why a test could never come out reproduced, or never contradicted (None: it can be either)."""
    kind = test["kind"]
    if kind == "best" and (test["technique"] not in test["among"] or len(set(test["among"])) < 2):
        return f"a best test needs {test['technique']!r} among at least two techniques"
    if kind == "best" and test["direction"] not in ("min", "max"):
        return f"direction must be min or max, not {test['direction']!r}"
    if kind in ("less", "ratio", "at_least") and test["a"] == test["b"]:
        return f"a {kind} test compares two different techniques"
    if kind == "ratio" and not 0 < test["lo"] < test["hi"]:
        return f"a ratio test needs 0 < lo < hi (got {test['lo']}, {test['hi']})"
    if kind == "at_least" and not test["ratio"] > 0:
        return f"an at_least test needs ratio > 0 (got {test['ratio']})"
    for holds, want in ((True, REPRODUCED), (False, CONTRADICTED)):
        got = run_test(test, synthetic(test, holds))[0]
        if got != want:
            return f"its {kind} test cannot come out {want} even on clear synthetic values (got {got})"
    return None


# -- one test ------------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    verdict: str
    evidence: str
    claimed: list[float]  # one-sided p-values of the comparisons the claim needs (all must reject)
    against: list[float]  # p-values of the hypotheses that contradict it (Holm across the claim)
    effect: str = ""
    missing: tuple[str, ...] = ()  # techniques a best claim ranks that did not run: it cannot be reproduced


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "none left (n=0)"
    mean, se, n = aggregate.mean_se(xs)
    return f"{mean:.4g}" + (f" ± {se:.2g}" if se else "") + f" (n={n})"


def _effect(name: str, diff: Diff, level: float = 1 - ALPHA) -> str:
    r, lo, hi = diff.ratio_ci(level)
    return f"{name} {r:.3g}x" + ("" if diff.exact else f" [{lo:.3g}, {hi:.3g}]")


def run_test(test: dict, values: dict[str, list[float] | None], exact: bool = False,
             alpha: float = ALPHA) -> tuple[str, str, Outcome]:
    """(verdict, evidence, outcome) of one test on {technique: its repeats}. `exact`: single published values
    compared as they are (the paper's numbers: no margin, no minimum number of repeats, and a best claim ranked
    among the techniques the table quotes)."""
    metric = test["metric"]
    r = rule(metric)
    margin = math.log1p(r.margin) if r.margin and not exact else 0.0  # published numbers: exact comparisons
    names = ([t for t in test["among"] if t in values] if test["kind"] == "best" else [test["a"], test["b"]])
    if test["kind"] == "best" and (test["technique"] not in names or len(names) < 2):
        why = f"needs {test['technique']} and another of {test['among']} (ran: {sorted(values)})"
        return UNTESTABLE, why, Outcome(UNTESTABLE, why, [], [])
    if test["kind"] != "best" and not all(n in values for n in names):
        why = f"needs {test['a']} and {test['b']} (ran: {sorted(values)})"
        return UNTESTABLE, why, Outcome(UNTESTABLE, why, [], [])
    absent = [t for t in names if values.get(t) is None]
    if absent:
        why = f"{metric} not measured for {', '.join(absent)}"
        return UNTESTABLE, why, Outcome(UNTESTABLE, why, [], [])
    if any(x <= 0 for t in names for x in values[t]):
        why = f"{metric} is not positive for every run (compared as ratios)"
        return UNTESTABLE, why, Outcome(UNTESTABLE, why, [], [])
    shown = f"{metric}: " + ", ".join(f"{t} {_fmt(values[t])}" for t in names)
    missing = tuple(t for t in test["among"] if t not in values) if test["kind"] == "best" and not exact else ()
    if missing:
        shown += f"; not run: {', '.join(missing)} (the claim ranks all of {', '.join(test['among'])})"
    few = {t: len(values[t]) for t in names if len(values[t]) < r.min_runs}
    if few and not exact:
        why = (f"{min(few.values())} seed(s), needs {r.min_runs} for a {METRIC_KIND.get(metric, 'quality')} claim "
               f"({', '.join(f'{t}: {n}' for t, n in few.items())}); {shown}")
        return INCONCLUSIVE, why, Outcome(INCONCLUSIVE, why, [], [])
    claimed, against, effects = [], [], []

    def pair(a: str, b: str) -> Diff:
        return log_diff(values[a], values[b])

    if test["kind"] in ("less", "best"):
        me = test["a"] if test["kind"] == "less" else test["technique"]
        lower = test["kind"] == "less" or test["direction"] == "min"
        bound = -margin if lower else margin  # the claimed difference: beyond the practical margin
        for other in [t for t in names if t != me]:
            d = pair(me, other)
            claimed.append(d.p_below(bound) if lower else d.p_above(bound))
            if d.exact and test["kind"] == "less":  # exact values: a tie at the bound refutes a strict difference
                against.append(0.0 if d.d >= bound else 1.0)
            else:  # refuted: not beyond the margin (within it, or the other way); exactly at it (margin 0: a tie
                # of counted or published values) a best claim stays open
                against.append(d.p_above(bound) if lower else d.p_below(bound))
            effects.append((claimed[-1], other, d))
        # the effect shown: the comparison the verdict hinges on (the weakest claimed one; the closest on a tie)
        _, other, d = max(effects, key=lambda e: (e[0], -abs(e[2].d)))
        effect = _effect(f"{metric} {me}/{other}", d, 1 - alpha)
    elif test["kind"] == "ratio":
        d = pair(test["a"], test["b"])
        lo, hi = math.log(test["lo"]), math.log(test["hi"])
        claimed += [d.p_above(lo), d.p_below(hi)]
        against += [d.p_below(lo), d.p_above(hi)]
        effect = _effect(f"{metric} {test['a']}/{test['b']}", d, 1 - alpha) + f" (claim {test['lo']}-{test['hi']})"
    else:  # at_least: metric(a) >= ratio * metric(b), one-sided (non-inferiority)
        d = pair(test["a"], test["b"])
        bound = math.log(test["ratio"])
        claimed.append(d.p_above(bound))
        against.append(d.p_below(bound))
        effect = _effect(f"{metric} {test['a']}/{test['b']}", d, 1 - alpha) + f" (claim >= {test['ratio']})"
    out = Outcome(INCONCLUSIVE, shown, claimed, against, effect, missing)
    out.verdict = decide([out], alpha)
    return out.verdict, shown, out


def decide(outcomes: list[Outcome], alpha: float = ALPHA) -> str:
    """One verdict from a claim's tests: reproduced if every claimed comparison rejects at alpha/2 (intersection-
    union), contradicted if Holm at alpha/2 rejects any contradicting hypothesis, else inconclusive; a claim whose
    tests could not all run, or that ranks a technique which did not run, is at most inconclusive, and not testable
    when none could."""
    tested = [o for o in outcomes if o.claimed or o.against]
    if not tested:
        return UNTESTABLE if all(o.verdict == UNTESTABLE for o in outcomes) else INCONCLUSIVE
    against = [p for o in tested for p in o.against]
    if any(holm(against, alpha / 2)):
        return CONTRADICTED
    if len(tested) == len(outcomes) and not any(o.missing for o in outcomes) \
            and all(p <= alpha / 2 for o in tested for p in o.claimed):
        return REPRODUCED
    return INCONCLUSIVE


# -- our records ---------------------------------------------------------------------------------------------------

def _metric(rec: runs.RunRecord, metric: str):
    v = rec.metrics.get(metric, rec.quality.get(metric))
    return None if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
        else float(v)


def _groups(recs: list[runs.RunRecord], group_by: tuple[str, ...]) -> dict[str, list[runs.RunRecord]]:
    """Records compared together: one group per scale and per value of the study's grouping params (peft: dataset)."""
    out: dict[str, list] = {}
    for r in recs:
        out.setdefault(" / ".join(str(v) for v in aggregate.group(r, group_by) if v is not None), []).append(r)
    return out


def repeats(recs: list[runs.RunRecord], group_by: tuple[str, ...] = ()) -> dict[str, list[runs.RunRecord]]:
    """{technique: its repeated runs} within one group: the records `aggregate.current` keeps (same settings and code
    version as the technique's newest record, seed aside) — other settings and stale code are not repeats."""
    out: dict[str, list] = {}
    for runs_ in aggregate.repeats(recs, group_by).values():
        out.setdefault(runs_[0].technique, []).extend(runs_)
    return out


def _compared(test: dict) -> list[str]:
    """The techniques one test compares."""
    return list(test["among"]) if test["kind"] == "best" else [test["a"], test["b"]]


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
        sizes = [model_params(r) for r in recs]
        biggest = max((s for s in sizes if s), default=0)
        if biggest < float(when["min_params"]):
            return f"needs models of >= {float(when['min_params']):.3g} parameters; the largest here has {biggest:.3g}"
    return None


def model_params(r: runs.RunRecord) -> float | None:
    """The parameters of the model a run measured: its `base_params` (a fine-tuned or adapted base) or `params`; for
    an inference record of an unquantized float precision (quantization's fp32, fp16, bf16 rows), its weights' bytes
    in memory over bytes per element (parameters and buffers, tied embeddings once: within a few hundred of the
    parameter count). A quantized row's bytes mix packed weights, scales and unquantized layers: no count."""
    if n := _metric(r, "base_params") or _metric(r, "params"):
        return n
    nbytes, bits = _metric(r, "memory_bytes"), _metric(r, "nominal_bits")
    return nbytes * 8 / bits if nbytes and bits in (16.0, 32.0) else None


def tokens_seen(r: runs.RunRecord) -> float | None:
    """Training tokens a run saw (steps x batch x accumulation x sequence length); None for inference runs."""
    if _metric(r, "tokens_seen"):
        return _metric(r, "tokens_seen")
    p = r.params if isinstance(r.params, dict) else {}
    if all(isinstance(p.get(k), int) for k in ("steps", "batch_size", "seq_len")):
        return float(p["steps"] * p["batch_size"] * p.get("grad_accum", 1) * p["seq_len"])
    return None


def pretrained_base(r: runs.RunRecord) -> bool:
    """Whether a run fine-tuned a checkpoint pretrained elsewhere (SmolLM2, a Hub model): some level of its
    `artifacts.base` (the VLM's: its language model's) has a source other than "suite". A base the suite pretrained
    itself (PEFT at tiny, the DiT fine-tuning) is judged by its own short pretraining, which the record does not
    carry."""
    base = r.artifacts.get("base") if isinstance(r.artifacts, dict) else None
    while isinstance(base, dict):
        if base.get("source") not in (None, "suite"):
            return True
        base = base.get("base")
    return False


def _size(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def evidence_level(recs: list[runs.RunRecord], seeds: int, profile: str) -> str:
    """The scale a verdict was reached at: level, parameters, tokens, tokens per parameter, seeds.

    Tokens per parameter is a pretraining budget (how far from compute-optimal a model trained from scratch is): it
    judges runs that trained their model. Runs that fine-tuned a pretrained checkpoint (`base_params` and
    `pretrained_base`: PEFT and the VLM on SmolLM2) are judged by the base's size, and their tokens are stated as
    fine-tuning tokens: the level says nothing of the fine-tuning budget, which the row states beside it."""
    params = max((s for r in recs if (s := model_params(r))), default=0.0)
    tuned, scratch = [], []
    for r in recs:
        (tuned if _metric(r, "base_params") and pretrained_base(r) else scratch).append(r)
    tokens = max((t for r in scratch if (t := tokens_seen(r))), default=None)
    ft_tokens = max((t for r in tuned if (t := tokens_seen(r))), default=None)
    tpp = tokens / params if tokens and params else None
    level = next(name for name, min_p, min_tpp in EVIDENCE_LEVELS
                 if params >= min_p and (tpp is None or tpp >= min_tpp))
    if profile == "tiny":
        level = "smoke"
    parts = [f"{_size(params)} params" if params else "params unknown"]
    if tokens:
        parts.append(f"{tokens / 1e6:.3g}M tokens ({tpp:.2g} tok/param)")
    if ft_tokens:
        parts.append(f"{ft_tokens / 1e6:.3g}M fine-tuning tokens")
    return f"{level}: " + ", ".join(parts + [f"{seeds} seed{'s' * (seeds != 1)}"])


def _curve_point(rs: list[runs.RunRecord], frac: float) -> float | None:
    """Mean training loss over the repeats around `frac` of the budget (a window of 10% of the steps)."""
    vals = []
    for r in rs:
        c = r.artifacts.get("loss_curve")
        if not isinstance(c, list) or len(c) < 10:
            return None
        lo = min(int(len(c) * (frac - 0.1 if frac >= 1 else frac - 0.05)), len(c) - 1)
        hi = max(int(len(c) * min(frac + 0.05, 1.0)), lo + 1)
        vals.append(sum(c[lo:hi]) / (hi - lo))
    return sum(vals) / len(vals) if vals else None


def stable_ranking(test: dict, by_tech: dict[str, list[runs.RunRecord]]) -> str | None:
    """For a perplexity or loss claim on trained models: None if the order the claim relies on is the same in the
    training loss at 50% and at 100% of the budget, else the reason it is not."""
    if test["metric"] not in ("ppl", "loss") or test["kind"] not in ("best", "less"):
        return None
    names = [t for t in _compared(test) if t in by_tech]
    half = {t: _curve_point(by_tech[t], 0.5) for t in names}
    end = {t: _curve_point(by_tech[t], 1.0) for t in names}
    if any(v is None for v in [*half.values(), *end.values()]) or len(names) < 2:
        return None
    if test["kind"] == "best":
        pick = min if test["direction"] == "min" else max
        first, last = pick(half, key=half.get), pick(end, key=end.get)
    else:
        first, last = half[names[0]] < half[names[1]], end[names[0]] < end[names[1]]
    if first == last:
        return None
    return f"ranking unstable: training loss at 50% of the budget {half}, at 100% {end}"


def _values(by_tech: dict[str, list[runs.RunRecord]], metric: str,
            measured: dict[str, list[runs.RunRecord]] | None = None) -> dict[str, list[float] | None]:
    """{technique: its values of `metric`}: None where its runs (`measured`: before any were set aside) did not
    measure it, [] where they did but none is left (all set aside): the first is not testable, the second too few
    repeats."""
    def of(rs):
        return [v for r in rs if (v := _metric(r, metric)) is not None]

    measured = by_tech if measured is None else measured
    return {tech: of(rs) if of(measured.get(tech, rs)) else None for tech, rs in by_tech.items()}


CPU_SENSITIVE = ("time", "energy")  # metric kinds a run that shared its CPUs distorts (quality, memory, size stand)


def set_aside(test: dict, by_tech: dict[str, list[runs.RunRecord]]) -> tuple[dict[str, list[runs.RunRecord]], list[str]]:
    """The repeats a time or energy test compares: without the runs whose CPUs other work shared
    (`provenance.shared_cpu`, above SHARED_CPU_WARN of the host's capacity), with one note naming them. Their times
    and watts measure the other work as much as the technique; the contention comes from outside the run (a test
    suite beside the batch), not from the technique, so leaving the run out does not bias the comparison the way
    dropping a failed seed would (`lost_seeds`), and MIN_RUNS still applies to what is left. A quality, memory or
    size test keeps them."""
    if METRIC_KIND.get(test["metric"], "quality") not in CPU_SENSITIVE:
        return by_tech, []
    shared = {id(r) for t in _compared(test) for r in provenance.shared_cpu(by_tech.get(t, []))}
    if not shared:
        return by_tech, []
    kept = {t: [r for r in rs if id(r) not in shared] for t, rs in by_tech.items()}
    named = [f"{t} seed {r.params.get('seed')} ({r.environment['host_other_cpu_frac']:.0%})"
             for t in _compared(test) for r in by_tech.get(t, []) if id(r) in shared]
    return (kept, [f"set aside for {test['metric']} (other work held the CPUs): {', '.join(named)}"])


def lost_seeds(test: dict, by_tech: dict[str, list[runs.RunRecord]], failed: list[runs.RunRecord]) -> list[str]:
    """The reported seeds of the test's techniques that gave no value of its metric: a failed run of the same
    settings and code as the technique's repeats (no ok record of that seed), or an ok run without the metric (a
    diverged one). Judged on its survivors alone, a technique that fails or diverges on some seeds would look better
    than it is."""
    out = []
    for t in _compared(test):
        rs = by_tech.get(t)
        if not rs or all(_metric(r, test["metric"]) is None for r in rs):  # not measured at all: not testable
            continue
        keep, seeds = aggregate.settings(rs[0]), {r.params.get("seed") for r in rs}
        lost = {r.params.get("seed"): r for r in failed if r.technique == t and aggregate.settings(r) == keep
                and r.params.get("seed") not in seeds}
        out += [f"{t} seed {s} failed" + (f" ({_first_line(lost[s].error)})" if lost[s].error else "")
                for s in sorted(lost, key=str)]  # a reported seed that diverged is a failed run (TrainingDiverged)
        out += [f"{t} seed {r.params.get('seed')} gave no {test['metric']}"
                + (f" (diverged: {r.artifacts['diverged']})" if r.artifacts.get("diverged") else "")
                for r in rs if _metric(r, test["metric"]) is None]
    return out


def _first_line(text: str, limit: int = 100) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def failed_only(claim: dict, by_tech: dict[str, list[runs.RunRecord]], failed: list[runs.RunRecord]) -> list[str]:
    """The claim's techniques with failed runs and no ok one in this group (shown as "not run" by the tests)."""
    return [f"every run of {t} failed ({len(rs)}: {_first_line(rs[0].error)})"
            for t in sorted(_named(claim) - set(by_tech))
            if (rs := [r for r in failed if r.technique == t])]


def sweep_edge(sweep: dict) -> tuple[str, float, float] | None:
    """("smallest" or "largest", the smallest and the largest LR tried) where a sweep's (`artifacts.lr_sweep`) best
    learning rate is an end of its grid, else None. A point without a value (engine.sweep writes None for a diverged
    and a failed point alike) bounds the grid only above the largest finite one: a larger LR diverging is why it has
    none, while a failure that does not depend on the LR (out of memory) would have failed at every point; below, it
    says nothing. A malformed sweep (not a dict of LR -> value) gives None."""
    values = sweep.get("values")
    if not isinstance(values, dict) or not isinstance(sweep.get("best"), (int, float)):
        return None
    try:
        points = sorted((float(lr), v) for lr, v in values.items())
    except (TypeError, ValueError):
        return None
    finite = [lr for lr, v in points if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None
    lo, hi = finite[0], max(lr for lr, _ in points)
    if hi - lo <= 0:
        return None
    best = float(sweep["best"])
    # the values' keys are the LRs to 6 significant digits (engine.sweep), `best` is the full float
    side = ("smallest" if math.isclose(best, lo, rel_tol=1e-5) else
            "largest" if math.isclose(best, hi, rel_tol=1e-5) else None)
    return (side, lo, hi) if side else None


def lr_pick_note(technique: str, rs: list[runs.RunRecord], alpha: float = ALPHA) -> str | None:
    """Why a technique's learning rate, picked by its sweep (engine.sweep: one run per point, at the sweep's own
    seed), may not be its best: the pick is an end of the grid (`sweep_edge`: the metric was still improving there,
    the optimum may lie beyond), or the sweep's best two points differ by less than one seed's noise can produce
    (z_{1-alpha/2} x sqrt(2) x the seed standard deviation of the log metric, from the reported repeats). A wrong
    pick only handicaps the technique, and it is the same for all its seeds, so no interval shows it. None: no
    sweep, or a clear pick inside the grid."""
    sweep = next((r.artifacts.get("lr_sweep") for r in rs if isinstance(r.artifacts.get("lr_sweep"), dict)), None)
    if not sweep or not isinstance(sweep.get("values"), dict) or not isinstance(sweep.get("best"), (int, float)):
        return None
    if edge := sweep_edge(sweep):
        return (f"{technique}'s learning rate ({sweep['best']:.3g}) is the {edge[0]} its sweep tried "
                f"({edge[1]:.3g}-{edge[2]:.3g}): its best may lie beyond the grid")
    points = sorted(v for v in (sweep.get("values") or {}).values()
                    if isinstance(v, (int, float)) and math.isfinite(v) and v > 0)
    logs = [math.log(v) for r in rs if (v := _metric(r, sweep.get("metric", ""))) and v > 0]
    if len(points) < 2 or len(logs) < 2:
        return None
    sd, gap = statistics.stdev(logs), math.log(points[1] / points[0])
    reach = statistics.NormalDist().inv_cdf(1 - alpha / 2) * math.sqrt(2) * sd
    if gap >= reach:
        return None
    return (f"{technique}'s learning rate ({sweep.get('best'):.3g}) was picked within seed noise: its sweep's best "
            f"two points differ by {gap:.1%} (log {sweep.get('metric')}), one seed's noise reaches {reach:.1%}")


def _lr_blocks(test: dict, by_tech: dict[str, list[runs.RunRecord]], alpha: float) -> tuple[list[str], list[str]]:
    """(notes that stop a reproduced verdict, notes that stop a contradicted one) from uncertain learning-rate picks
    of a quality test's techniques. A wrong pick makes a technique look worse than it is: where the claim favours a
    technique (the best one; `less`'s a on a lower-is-better metric such as perplexity, its b on a score), that
    technique's uncertain pick makes a contradicted verdict unsafe and the others' a reproduced one; a ratio's is
    unsafe either way."""
    if METRIC_KIND.get(test["metric"], "quality") != "quality":
        return [], []
    notes = {t: n for t in _compared(test) if t in by_tech and (n := lr_pick_note(t, by_tech[t], alpha))}
    if test["kind"] in ("less", "best"):
        favoured = test["technique"] if test["kind"] == "best" else (
            test["b"] if test["metric"] in HIGHER_IS_BETTER else test["a"])
        return [n for t, n in notes.items() if t != favoured], [n for t, n in notes.items() if t == favoured]
    return list(notes.values()), list(notes.values())


ENERGY_COLUMN = "energy per token"
DISAGREE = "power and energy per token disagree"


def _per_token(test: dict, power: Outcome, by_tech: dict[str, list[runs.RunRecord]], alpha: float = ALPHA) -> str:
    """A power (aec_w) comparison made again on J/token: average power rewards slow kernels (a technique drawing
    fewer watts for longer can spend more energy per token), so every power claim reports both, and says where
    their decisive verdicts point opposite ways."""
    j_test = dict(test, metric="j_per_token")
    clean, _ = set_aside(j_test, by_tech)
    verdict, _, out = run_test(j_test, _values(clean, "j_per_token", by_tech), alpha=alpha)
    text = f"J/token: {verdict}" + (f" ({out.effect})" if out.effect else "")
    if {verdict, power.verdict} == {REPRODUCED, CONTRADICTED}:
        text += f" — {DISAGREE}"
    return text


def paper_scale(scale: dict) -> str:
    """A claim's `scale` in words: `params` (one model size, or [smallest, largest] of the checkpoints it was
    measured on) and, for a trained backbone, `tokens`."""
    p = scale["params"]
    lo, hi = (float(p[0]), float(p[1])) if isinstance(p, list) else (float(p), float(p))
    text = f"{lo / 1e9:.3g}B" + (f"-{hi / 1e9:.3g}B" if hi != lo else "") + " params"
    if "tokens" in scale:
        text += f", {float(scale['tokens']) / 1e9:.3g}B tokens ({float(scale['tokens']) / lo:.2g} tok/param)"
    return text


def evaluate_group(claim: dict, recs: list[runs.RunRecord], group_by: tuple[str, ...], profile: str,
                   alpha: float = ALPHA) -> dict:
    """One row of the claims table: the claim's verdict on one group of records (ok and failed ones), with effect
    and evidence level."""
    ok, failed = [r for r in recs if r.status == "ok"], [r for r in recs if r.status != "ok"]
    reason = _when(claim, ok)
    by_tech = repeats(ok, group_by)
    seeds = min((len(by_tech[t]) for t in _named(claim) if t in by_tech), default=0)
    level = evidence_level([r for rs in by_tech.values() for r in rs] or ok, seeds, profile)  # the repeats
    if claim.get("scale"):  # the scale the paper's claim was made at, beside ours
        level += f"; the paper's claim: {paper_scale(claim['scale'])}"
    row = {"evidence level": level, ENERGY_COLUMN: ""}
    if reason:
        return row | {"verdict": UNTESTABLE, "effect": "", "evidence": reason}
    outcomes, notes, per_token = [], [], []
    for t in claim["tests"]:
        clean, aside = set_aside(t, by_tech)
        _, evidence, out = run_test(t, _values(clean, t["metric"], by_tech), alpha=alpha)
        outcomes.append(out)
        notes += [evidence, *aside]
        if t["metric"] == "aec_w":
            per_token.append(_per_token(t, out, by_tech, alpha))
    row[ENERGY_COLUMN] = " | ".join(per_token)
    notes += failed_only(claim, by_tech, failed)
    verdict = decide(outcomes, alpha)
    if verdict in (REPRODUCED, CONTRADICTED):  # what the intervals cannot show
        blocks = [_lr_blocks(t, by_tech, alpha) for t in claim["tests"]]
        why = [f"lost seeds: {', '.join(lost)}" for t in claim["tests"] if (lost := lost_seeds(t, by_tech, failed))]
        why += [n for b in blocks for n in b[verdict == CONTRADICTED]]
        why += [w for t in claim["tests"] if (w := stable_ranking(t, by_tech))]
        if why:
            verdict = INCONCLUSIVE
            notes += list(dict.fromkeys(why))
    return row | {"verdict": verdict, "effect": "; ".join(o.effect for o in outcomes if o.effect),
                  "evidence": " | ".join(notes)}


def evaluate(profile: str, claims: list[dict] | None = None, alpha: float = ALPHA):
    """One row per (claim, group of records): verdict, effect with its interval, evidence level and evidence on our
    records, and the paper's own numbers."""
    import pandas as pd

    claims = claims if claims is not None else load_claims()
    rows = []
    cache: dict[str, list] = {}
    for c in claims:
        if c["study"] not in cache:
            cache[c["study"]] = [r for r in runs.load_records(profile, c["study"])  # each at its best LR: no sweeps
                                 if not is_sweep_point(r)]
        recs, n_failed = cache[c["study"]], 0
        if not any(r.status == "ok" for r in recs):
            n_failed, recs = len(recs), []
        paper_verdict, paper_evidence = paper_check(c)
        base = {"id": c["id"], "claim": c["claim"], "source": c["source"], "study": c["study"], "profile": profile,
                "paper's own numbers": paper_verdict, "paper evidence": paper_evidence}
        if not recs:
            rows.append(base | {"group": "", "verdict": UNTESTABLE, "effect": "", "evidence level": "",
                                "evidence": f"no {'ok ' * bool(n_failed)}{c['study']} records yet"
                                + (f" ({n_failed} failed)" if n_failed else ""), ENERGY_COLUMN: ""})
            continue
        group_by = registry.get(c["study"]).group_by
        # a group of failed runs alone (a sweep point's scale, a group never measured) holds nothing to compare
        groups = {g: rs for g, rs in _groups(recs, group_by).items() if any(r.status == "ok" for r in rs)}
        # a group that ran none of the claim's techniques (the DiT fine-tuning methods for a DiT attention claim) is
        # not a test of it; all groups stay when none did, so the row says what is missing
        groups = {g: rs for g, rs in groups.items() if {r.technique for r in rs if r.status == "ok"} & _named(c)} \
            or groups
        for group, grecs in groups.items():
            rows.append(base | {"group": group} | evaluate_group(c, grecs, group_by, profile, alpha))
    cols = ["id", "claim", "source", "study", "profile", "group", "verdict", "effect", "evidence level", "evidence",
            ENERGY_COLUMN, "paper's own numbers", "paper evidence"]
    return pd.DataFrame(rows, columns=cols)


# -- the paper's own numbers ---------------------------------------------------------------------------------------

def _params_of(name: str) -> float | None:
    m = re.search(r"(\d+(?:\.\d+)?)B\b", str(name))
    return float(m.group(1)) * 1e9 if m else None


def paper_check(claim: dict) -> tuple[str, str]:
    """The claim's tests on the paper's published values (single numbers, compared exactly), over each group of
    rows; 'agree' if every group holds, 'disagree' if one fails, 'no numbers' where the values were not quoted."""
    import pandas as pd

    from effllm_utils.report.paper import read_csv

    spec = claim.get("paper")
    if not spec:
        return "no numbers", "no table values for this claim"
    df = read_csv(spec["file"])
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
        outcomes, es = [], []
        for t in claim["tests"]:
            tv = {tech: ([float(v[t["metric"]])] if t["metric"] in v else None) for tech, v in vals.items()}
            _, e, out = run_test(t, tv, exact=True)
            outcomes.append(out)
            es.append(e.replace(" (n=1)", "") + (f" ({out.effect})" if out.effect else ""))
        verdict = decide(outcomes)
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
