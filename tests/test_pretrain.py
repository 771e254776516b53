"""The architecture-study layer end to end on a micro configuration, from params to records, tables and figures."""
import pytest

from effllm_utils.core import aggregate
from effllm_utils.measure import metrics
from effllm_utils.models import techniques
from effllm_utils.report import overview, tables, views
from effllm_utils.studies import pretraining

DIMS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4, "v_head_dim": 8, "nsa_block_size": 8, "nsa_num_selected": 2, "nsa_window": 8}
P = dict(device="auto", scales={"micro": DIMS}, vocab_size=512, dataset="embedded", tokenizer="embedded",
         train_tokens=0, steps=4, batch_size=4, grad_accum=1, seq_len=32, lr=0.003, warmup_steps=1, eval_every=1000,
         eval_batches=1, precision="auto", compile=False, seed=0, save_checkpoints=True)


def test_depth_width_holds_non_embedding_parameters():
    base = techniques.non_embedding_params(techniques._base_config(DIMS, 512, {}))
    for layers in (1, 2, 4, 8):
        o = techniques.match_hidden_size(DIMS, 512, {"num_hidden_layers": layers})
        n = techniques.non_embedding_params(techniques._base_config(DIMS, 512, o))
        assert abs(n - base) / base < 0.15, (layers, o, n, base)
        assert o["hidden_size"] % 8 == 0 and o["num_hidden_layers"] == layers


def test_build_model_backbone_and_baseline():
    model, fpt, kv = techniques.build_model(DIMS, 512, {"attention": "mla"}, context=32)
    assert model.config.attention == "mla" and kv == 2 * (16 + 4) * 2
    assert fpt == metrics.training_flops_per_token(model.config.shape(), 32)
    backbone, _, _ = techniques.build_model(DIMS, 512, {}, context=32)
    mamba, fpt, kv = techniques.build_model(DIMS, 512, {"baseline": "mamba"}, context=32)
    from effllm_utils.models import baselines

    assert type(mamba).__name__ == "MambaForCausalLM" and kv is None
    assert fpt == 3 * baselines.forward_flops_per_token(mamba, "mamba", 32)  # the one FLOP convention
    assert abs(mamba.num_parameters() - backbone.num_parameters()) <= 0.1 * backbone.num_parameters()
    with pytest.raises(ValueError, match="unknown baseline family 'lstm'"):
        techniques.build_model(DIMS, 512, {"baseline": "lstm"}, context=32)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        techniques.build_model(DIMS, 512, {"attention": "flash"}, context=32)


def test_baseline_overrides_reach_the_transformers_config_and_the_width_search():
    backbone, _, _ = techniques.build_model(DIMS, 512, {}, context=32)
    par, _, _ = techniques.build_model(DIMS, 512, {"baseline": "pythia"}, context=32)
    full_rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    seq, _, _ = techniques.build_model(DIMS, 512, {"baseline": "pythia", "use_parallel_residual": False,
                                                "rope_parameters": full_rope}, context=32)
    assert par.config.use_parallel_residual and par.config.rope_parameters["partial_rotary_factor"] == 0.25
    assert not seq.config.use_parallel_residual and seq.config.rope_parameters["partial_rotary_factor"] == 1.0
    wide, _, _ = techniques.build_model(DIMS, 512, {"baseline": "rwkv", "intermediate_size": 8}, context=32)
    rwkv, _, _ = techniques.build_model(DIMS, 512, {"baseline": "rwkv"}, context=32)
    assert wide.config.intermediate_size == 8 and wide.config.hidden_size > rwkv.config.hidden_size  # re-matched
    assert abs(wide.num_parameters() - backbone.num_parameters()) <= 0.1 * backbone.num_parameters()


@pytest.mark.parametrize("spec, message", [
    ({"atention": "mla"}, r"techniques\['bad'\]: unknown config key 'atention' \(did you mean 'attention'\?\)"),
    ({"attention": "flash"}, r"techniques\['bad'\] at scale 'micro': unknown attention 'flash'"),
    ({"baseline": "pythia", "use_paralel_residual": False},
     r"techniques\['bad'\]: unknown GPTNeoXConfig field 'use_paralel_residual' \(did you mean "
     r"'use_parallel_residual'\?\)"),
    ({"baseline": "mamba", "hidden_size": 64}, r"hidden_size of the mamba baseline is set by matching"),
    ({"baseline": "lstm"}, r"unknown baseline family 'lstm'"),
    ({"baseline": "rwkv", "match_params": True}, r"match_params does not apply to a baseline"),
])
def test_a_bad_technique_stops_the_study_before_any_run_trains(outputs, spec, message):
    params = P | {"techniques": {"gqa": {}, "bad": spec}}
    with pytest.raises(ValueError, match=message):
        pretraining.run_study("attention", "tiny", params)
    assert not (outputs / "tiny" / "runs").exists() or not any((outputs / "tiny" / "runs").rglob("*.json"))


def test_a_typo_in_a_scale_or_a_named_config_is_an_error():
    from effllm_utils import models

    with pytest.raises(ValueError, match=r"scales\['micro'\]: unknown config key 'hiden_size' \(did you mean "
                                         r"'hidden_size'\?\)"):
        techniques.check_specs(P | {"scales": {"micro": DIMS | {"hiden_size": 64}}, "techniques": {"gqa": {}}})
    with pytest.raises(ValueError, match=r"models.config\('tiny'\): unknown config key 'possition'"):
        models.config("tiny", possition="none")
    assert models.config("tiny", position="none").position == "none"


def test_run_study_records_tables_figures_and_skips(outputs):
    params = P | {"techniques": {"gqa": {"attention": "gqa"}, "nsa": {"attention": "nsa"},
                                 "rwkv": {"baseline": "rwkv"}, "mamba": {"baseline": "mamba"}}}
    recs = pretraining.run_study("attention", "tiny", params)
    assert [(r.technique, r.status) for r in recs] == [("gqa", "ok"), ("nsa", "ok"), ("rwkv", "ok"),
                                                       ("mamba", "ok")], [r.error for r in recs]
    assert recs[3].artifacts["selective_scan"].startswith("effllm CPU") and "selective_scan" not in recs[2].artifacts
    gqa = recs[0]
    assert gqa.scale == "micro" and gqa.metrics["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 2
    assert gqa.metrics["tokens_seen"] == 4 * 4 * 32  # the budget: steps x batch x seq_len, per parameter beside it
    assert gqa.metrics["tokens_per_param"] == pytest.approx(512 / gqa.metrics["params"])
    assert gqa.quality["ppl"] > 1 and len(gqa.artifacts["loss_curve"]) == 4
    assert "pcu" in gqa.metrics or "no peak" in gqa.artifacts["peak_flops_source"]
    assert recs[2].artifacts["flops_per_token_source"].startswith("analytic, baseline convention")
    assert (outputs / "tiny" / "checkpoints" / "attention" / "micro-gqa" / "model.safetensors").is_file()
    runs_tracked = {p.parent.name for p in (outputs / "tiny" / "tensorboard" / "attention").rglob("events.out.*")}
    assert {"micro-gqa-seed0-lr0.003", "micro-mamba-seed0-lr0.003"} <= runs_tracked  # TensorBoard, by default
    table = views.pretraining_table("tiny", "attention")
    assert list(table["technique"]) == ["gqa", "mamba", "nsa", "rwkv"] and "AMU (GB)" in table and "PPL" in table
    assert list(table["tokens seen (tokens)"]) == [512] * 4 and "tokens/param" in table
    paths = {p.name for p in views.pretraining_figures("tiny", "attention")}
    assert {"attention.csv", "attention.md", "attention.tex", "attention_micro.pdf", "attention_micro.png",
            "attention_micro.svg"} <= paths
    assert "| technique" in (outputs / "tiny" / "tables" / "attention.md").read_text()
    again = pretraining.run_study("attention", "tiny", params)  # records exist: nothing is retrained
    assert [r.duration_s for r in again] == [r.duration_s for r in recs]
    drawn = overview.draw("tiny")
    assert drawn["attention"] and drawn["moe"] == [] and drawn["hardware"] == []


def test_missing_hub_data_is_a_failed_record_with_one_clear_line(outputs, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    params = P | {"techniques": {"gqa": {}}, "tokenizer": "Qwen/Qwen2.5-0.5B", "dataset": "fineweb_edu"}
    rec = pretraining.run_study("attention", "tiny", params)[0]
    assert rec.status == "failed" and "DatasetUnavailable: tokenizer 'Qwen/Qwen2.5-0.5B' could not be loaded" \
        in rec.error and "\n" not in rec.error
    assert aggregate.load_runs("tiny", "attention")["status"].tolist() == ["failed"]


def test_gpu_profile_without_a_gpu_says_so(outputs):
    with pytest.raises(ValueError, match="profile 'gpu' needs a CUDA GPU"):
        pretraining.run_study("attention", "gpu", P | {"techniques": {"gqa": {}}})


@pytest.mark.parametrize("family", ["mamba", "rwkv", "pythia"])
def test_baselines_match_the_tiny_backbone_within_ten_percent(family):
    from effllm_utils import models
    from effllm_utils.models.baselines import build_baseline

    target = models.EffLLMForCausalLM(models.config("tiny")).num_parameters()
    model = build_baseline(family, target, n_layers=4, vocab_size=4096, context=512)
    assert abs(model.num_parameters() - target) <= 0.1 * target
    assert model.config.num_hidden_layers == 4


def test_tables_escape_what_would_break_markdown_and_latex(outputs):
    import pandas as pd

    df = pd.DataFrame({"technique": ["moe_8x", "gqa"], "MFU (%)": [41.5, float("nan")],
                       "evidence": ["ppl: a 1 | amu: a 2", "x"], "AEC (W)": [None, None]})
    csv, md, tex = (p.read_text() for p in tables.write_table(df, "tiny", "t"))
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 4 and {line.replace(r"\|", "").count("|") for line in rows} == {5}  # 4 columns per row
    assert r"ppl: a 1 \| amu: a 2" in md and "nan" not in md.lower()
    assert r"moe\_8x" in tex and r"MFU (\%)" in tex and "--" in tex and "NaN" not in tex
    assert "moe_8x,41.5,ppl: a 1 | amu: a 2" in csv  # the CSV keeps the values as they are


def test_an_nsa_that_covers_its_context_is_refused_and_the_profiles_are_sparse():
    old_gpu = {"attention": "nsa", "nsa_block_size": 64, "nsa_num_selected": 16, "nsa_window": 512}
    with pytest.raises(ValueError, match=r"techniques\['nsa'\]: NSA's 16 selected blocks x 64 tokens \+ a 512-token "
                                         r"window cover the 1024-token context, so it would be dense attention"):
        techniques.check_specs(P | {"seq_len": 1024, "techniques": {"nsa": old_gpu}})
    with pytest.raises(ValueError, match=r"match_params must be true \(solve the width\), ffn"):
        techniques.check_specs(P | {"techniques": {"x": {"match_params": "depth"}}})
    from effllm_utils.core import params

    for profile in ("tiny", "small", "gpu", "paper"):  # every profile's attention study passes the check
        techniques.check_specs(params.effective("attention", params.study_params("attention", profile)))


def test_attention_variants_hold_gqas_non_embedding_parameters_and_mha_is_a_row():
    from effllm_utils.core import params

    Q = params.effective("attention", params.study_params("attention", "tiny"))
    assert set(Q["techniques"]) == {"mha", "mqa", "gqa", "mla", "nsa"}
    dims = techniques.scales(Q)["tiny"]
    base = techniques.non_embedding_params(techniques._base_config(dims, Q["vocab_size"], {}))
    counts = {}
    for name, spec in Q["techniques"].items():
        model, _, _ = techniques.build_model(dims, Q["vocab_size"], spec, Q["seq_len"])
        counts[name] = sum(p.numel() for k, p in model.named_parameters()
                           if "embed_tokens" not in k and "lm_head" not in k)
        assert model.config.hidden_size == dims["hidden_size"] and model.config.attention == name
        assert abs(counts[name] - base) / base < 0.01, (name, counts[name], base)
    unmatched, _, _ = techniques.build_model(dims, Q["vocab_size"], {"attention": "mla"}, Q["seq_len"])
    assert unmatched.config.intermediate_size > techniques.build_model(
        dims, Q["vocab_size"], Q["techniques"]["mla"], Q["seq_len"])[0].config.intermediate_size  # MLA gave up FFN


def test_each_technique_at_its_best_learning_rate(outputs):
    """lr_sweep_points: 3 trains lr/3, lr, 3 lr at the sweep's own seed (1000 by default), records each, and trains
    the technique's record anew at the best by validation perplexity at the reported seed; tables list the sweep,
    figures and claims use the best; another seed reuses the sweep; a second call trains nothing."""
    from effllm_utils.engine import sweep
    from effllm_utils.report import claims

    assert sweep.lr_grid(0.003, 3, 3.0) == pytest.approx([0.001, 0.003, 0.009])
    assert sweep.lr_grid(1.0, 2, 4.0) == pytest.approx([0.5, 2.0])
    params = P | {"techniques": {"gqa": {"attention": "gqa"}}, "lr_sweep_points": 3, "lr_sweep_factor": 3.0}
    (best,) = pretraining.run_study("attention", "tiny", params)
    points = [r for r in aggregate.load_current("tiny", "attention", ()) if sweep.is_sweep_point(r)]
    assert sorted(r.scale for r in points) == ["micro lr=0.001", "micro lr=0.003", "micro lr=0.009"]
    assert {r.params["seed"] for r in points} == {sweep.SWEEP_SEED}
    by_lr = {r.params["lr"]: r.quality["ppl"] for r in points}
    assert best.status == "ok" and best.scale == "micro" and best.params["lr"] == min(by_lr, key=by_lr.get)
    assert best.params["seed"] == 0 and "copied_from" not in best.artifacts
    # trained anew at seed 0: another initialisation and batch order than the sweep point at the same LR
    assert best.quality["ppl"] != pytest.approx(by_lr[best.params["lr"]], rel=1e-6)
    assert best.artifacts["lr_sweep"]["best"] == best.params["lr"] and len(best.artifacts["lr_sweep"]["values"]) == 3
    assert best.artifacts["lr_sweep"]["seed"] == sweep.SWEEP_SEED
    table = views.pretraining_table("tiny", "attention")
    assert len(table) == 4 and sorted(table["LR"]) == sorted([*by_lr, best.params["lr"]])
    assert [r.scale for r in claims.repeats(  # the claims see the technique at its best LR only
        [r for r in claims.runs.load_records("tiny", "attention") if not sweep.is_sweep_point(r)])["gqa"]] == ["micro"]
    other = pretraining.run_study("attention", "tiny", params | {"seed": 1})[0]  # another seed: the sweep is reused
    assert other.params["lr"] == best.params["lr"] and other.quality["ppl"] != best.quality["ppl"]
    assert len([r for r in aggregate.load_current("tiny", "attention", ()) if sweep.is_sweep_point(r)]) == 3
    again = pretraining.run_study("attention", "tiny", params)[0]
    assert again.run_id == best.run_id and again.started_at == best.started_at  # resumed: nothing retrained
    with pytest.raises(ValueError, match="lr_sweep_seed 0 is also a reported seed"):
        pretraining.run_study("attention", "tiny", params | {"lr_sweep_seed": 0})

def test_a_run_two_studies_share_is_trained_once_and_recorded_in_both(outputs, monkeypatch):
    """The default backbone is attention's gqa and positional_encoding's rope: the same model, data, budget, LR and
    seed. The second study records the first's run (`same_run_as`) instead of training it again; another technique,
    another seed or --force outside a batch trains."""
    from effllm_utils.core import runs
    from effllm_utils.engine import train as train_module

    base = P | {"save_checkpoints": False, "lr_sweep_points": 0}
    (gqa,) = pretraining.run_study("attention", "tiny", base | {"techniques": {"gqa": {"attention": "gqa"}}})
    assert gqa.status == "ok" and gqa.artifacts["computation"] and "same_run_as" not in gqa.artifacts
    trained = []
    real_train = train_module.train
    monkeypatch.setattr(train_module, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    rope, nope = pretraining.run_study("positional_encoding", "tiny", base | {
        "techniques": {"rope": {"position": "rope"}, "none": {"position": "none"}}})
    assert rope.artifacts["same_run_as"] == gqa.run_id and rope.quality == gqa.quality
    assert rope.metrics == gqa.metrics and rope.study == "positional_encoding" and rope.technique == "rope"
    assert rope.environment == gqa.environment and rope.artifacts["same_run_started"] == gqa.started_at
    assert "same_run_as" not in nope.artifacts and len(trained) == 1  # only the other model trained
    assert not runs.shared_copies_changed([rope, nope])
    (faster,) = pretraining.run_study("positional_encoding", "tiny", base | {
        "techniques": {"rope": {"position": "rope"}}, "lr": 0.001})
    assert "same_run_as" not in faster.artifacts and len(trained) == 2  # another LR is another run
    (seed1,) = pretraining.run_study("positional_encoding", "tiny", base | {
        "techniques": {"rope": {"position": "rope"}}, "seed": 1})
    assert "same_run_as" not in seed1.artifacts and len(trained) == 3  # another seed is another run
    (forced,) = pretraining.run_study("positional_encoding", "tiny", base | {
        "techniques": {"rope": {"position": "rope"}}}, force=True)
    assert "same_run_as" not in forced.artifacts and len(trained) == 4  # --force measures it here
