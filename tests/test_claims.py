"""The claims check: test kinds with uncertainty, the paper's own numbers, evaluation on records."""
import pytest

from effllm_utils import claims, runs
from effllm_utils.claims import CONTRADICTED, INCONCLUSIVE, REPRODUCED, UNTESTABLE, Value


def v(x, se=None):
    return Value(x, se, 1 if se is None else 3, "test")


def test_best_less_ratio_with_margin_and_uncertainty():
    best = {"kind": "best", "technique": "a", "among": ["a", "b", "c"], "metric": "ppl", "direction": "min"}
    assert claims.run_test(best, {"a": v(10), "b": v(12), "c": v(13)}, 0.05)[0] == REPRODUCED
    assert claims.run_test(best, {"a": v(10), "b": v(10.2), "c": v(13)}, 0.05)[0] == INCONCLUSIVE  # within 5%
    assert claims.run_test(best, {"a": v(12), "b": v(10), "c": v(13)}, 0.05)[0] == CONTRADICTED
    assert claims.run_test(best | {"direction": "max"}, {"a": v(13), "b": v(10), "c": v(12)}, 0.05)[0] == REPRODUCED
    # a 20% gap is not decisive when the standard errors are larger than it
    assert claims.run_test(best, {"a": v(10, 2.0), "b": v(12, 2.0), "c": v(30)}, 0.05)[0] == INCONCLUSIVE
    verdict, evidence = claims.run_test(best, {"a": v(10), "b": None, "c": v(13)}, 0.05)
    assert verdict == UNTESTABLE and "ppl not measured for b" in evidence
    less = {"kind": "less", "a": "x", "b": "y", "metric": "al_s"}
    assert claims.run_test(less, {"x": v(1.0), "y": v(2.0)}, 0.05)[0] == REPRODUCED
    assert claims.run_test(less, {"x": v(1.0)}, 0.05)[0] == UNTESTABLE
    ratio = {"kind": "ratio", "a": "x", "b": "y", "metric": "amu_gb", "lo": 1.2, "hi": 1.6}
    assert claims.run_test(ratio, {"x": v(14.0), "y": v(10.0)}, 0.05)[0] == REPRODUCED
    assert claims.run_test(ratio, {"x": v(15.9), "y": v(10.0)}, 0.05)[0] == INCONCLUSIVE  # 1.59 +- 5% straddles 1.6
    assert claims.run_test(ratio, {"x": v(20.0), "y": v(10.0)}, 0.05)[0] == CONTRADICTED
    assert claims.combine([REPRODUCED, UNTESTABLE]) == INCONCLUSIVE
    assert claims.combine([REPRODUCED, CONTRADICTED]) == CONTRADICTED


def _rec(technique, ppl, seed=0, steps=None, **params):
    r = runs.RunRecord(run_id=f"{technique}-{seed}", study="attention", technique=technique, profile="tiny",
                       scale="s", params={"seed": seed, **params}, quality={"ppl": ppl}, metrics={"al_s": ppl / 100},
                       started_at=f"2026-01-01T00:00:0{seed}")
    r.artifacts = {"step_s": steps} if steps else {}
    return r


def test_values_use_repeats_and_step_times():
    rs = [_rec("a", 10.0, 0), _rec("a", 12.0, 1)]
    val = claims.value(rs, "ppl")
    assert val.mean == pytest.approx(11.0) and val.se == pytest.approx(1.0) and val.n == 2
    single = claims.value([_rec("a", 10.0, steps=[9, 9] + [0.1, 0.1, 0.1, 0.1, 0.1, 0.1])], "al_s")
    assert single.se == pytest.approx(0.0) and "6 steps" in single.how
    assert claims.value([_rec("a", 10.0)], "aec_w") is None
    # only records of the newest params count as repeats of a technique
    groups = claims.repeats([_rec("a", 10.0, 0, lr=1), _rec("a", 11.0, 1, lr=1), _rec("a", 50.0, 2, lr=2)])
    assert [r.quality["ppl"] for r in groups["a"]] == [50.0]


def test_the_claims_file_loads_and_checks_the_paper_against_itself():
    cs = {c["id"]: c for c in claims.load_claims()}
    assert len(cs) >= 12 and {"mqa_lowest_amu", "moe_memory_up_40pct", "bf16_beats_fp16_hopper"} <= set(cs)
    assert claims.paper_check(cs["mla_lowest_ppl"])[0] == "agree"
    verdict, evidence = claims.paper_check(cs["moe_memory_up_40pct"])  # the README: the table gives +71%, not +40%
    assert verdict == "disagree" and "1.71" in evidence
    assert claims.paper_check(cs["bf16_beats_fp16_hopper"])[0] == "disagree"  # fp16 is faster in the quoted rows
    assert "none 8.75" in claims.paper_check(cs["rope_best_ppl"])[1]  # the row named "None" is read as a method


def test_bad_claims_files_are_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("claims:\n  - {id: x, claim: c, source: s, study: attention, tests: [{kind: most, metric: ppl}]}\n")
    with pytest.raises(ValueError, match="claim 'x': unknown test kind 'most'"):
        claims.load_claims(p)
    p.write_text("claims:\n  - {id: x, claim: c, source: s, study: attention, tests: [{kind: less, a: m}]}\n")
    with pytest.raises(ValueError, match=r"a less test needs \['b', 'metric'\]"):
        claims.load_claims(p)


def test_evaluate_on_records(outputs):
    for tech, ppl, amu in (("mqa", 400.0, 1.0), ("gqa", 410.0, 1.01), ("mla", 300.0, 1.1)):
        runs.execute("attention", tech, "tiny", {"seed": 0}, lambda ppl=ppl, amu=amu: {
            "quality": {"ppl": ppl}, "metrics": {"amu_gb": amu, "aec_w": None}}, scale="tiny", verbose=False)
    df = claims.evaluate("tiny").set_index("id")
    assert df.loc["mla_lowest_ppl", "verdict"] == REPRODUCED
    assert df.loc["mqa_lowest_amu", "verdict"] == INCONCLUSIVE  # 1% below gqa: within the single-run margin
    assert df.loc["nsa_lowest_power", "verdict"] == UNTESTABLE
    assert df.loc["bf16_beats_fp16_hopper", "evidence"] == "no quantization records yet"
    assert set(df["verdict"]) <= {REPRODUCED, CONTRADICTED, INCONCLUSIVE, UNTESTABLE}



def _lvm(runs_: tuple) -> None:
    for tech, scale, fid in runs_:
        runs.execute("lvm", tech, "tiny", {"seed": 0}, lambda fid=fid: {"quality": {"fid": fid}}, scale=scale,
                     verbose=False)


def test_a_group_without_the_claims_techniques_is_not_a_row(outputs):
    """The lvm study holds DiT pretraining (scale tiny) and DiT fine-tuning (scale tiny-ft) records: a claim about
    attention variants is tested on the first only."""
    _lvm((("mha", "tiny", 30.0), ("mqa", "tiny", 20.0), ("gqa", "tiny", 21.0), ("lora", "tiny-ft", 25.0),
          ("full", "tiny-ft", 24.0)))
    df = claims.evaluate("tiny")
    rows = df[df["id"] == "dit_gqa_mqa_beat_mha_fid"]
    assert list(rows["group"]) == ["tiny"] and list(rows["verdict"]) == [REPRODUCED]
    moe = df[df["id"] == "dit_moe_better_fid"]  # mha ran, moe did not: the pretraining group says what is missing
    assert list(moe["group"]) == ["tiny"] and "needs moe and mha" in moe["evidence"].iloc[0]


def test_with_none_of_the_claims_techniques_every_group_says_so(outputs):
    _lvm((("lora", "tiny-ft", 25.0), ("full", "tiny-ft", 24.0)))
    rows = claims.evaluate("tiny")
    rows = rows[rows["id"] == "dit_gqa_mqa_beat_mha_fid"]
    assert list(rows["group"]) == ["tiny-ft"] and rows["verdict"].iloc[0] == UNTESTABLE
    assert "needs mqa and mha" in rows["evidence"].iloc[0]
