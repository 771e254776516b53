import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effllm_utils import models
from effllm_utils.engine.train import Data, TrainConfig, TrainingDiverged, compiled, lr_lambda, train

HELPER = Path(__file__).parent / "helpers" / "ddp_train.py"
IDS = (torch.arange(8_000) * 7 + torch.arange(8_000) // 97) % 128  # learnable: the next token follows from this one


def test_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_batches_are_a_pure_function_of_step():
    d = Data(torch.arange(1000), 32, "train")
    a = d.train_picks(4, step=3, micro=1, seed=0)
    assert torch.equal(a, d.train_picks(4, step=3, micro=1, seed=0))
    assert not torch.equal(a, d.train_picks(4, step=4, micro=1, seed=0))
    b = d.batch(a)
    x, y = b["input_ids"], b["labels"]
    assert x.shape == (4, 32) and torch.equal(x, y) and torch.equal(x[0], torch.arange(a[0], a[0] + 32))


def test_examples_carry_extra_tensors_to_the_model():
    ids = torch.zeros(6, 4, dtype=torch.long)
    pixels = torch.arange(6.0)[:, None, None].expand(6, 2, 2)
    d = Data({"input_ids": ids, "labels": ids, "pixel_values": pixels}, 4, "train")
    b = d.batch(torch.tensor([5, 1]))
    assert set(b) == {"input_ids", "labels", "pixel_values"} and b["pixel_values"][:, 0, 0].tolist() == [5.0, 1.0]
    with pytest.raises(ValueError, match=r"\['pixel_values'\] must be tensors with one row per example \(6\)"):
        Data({"input_ids": ids, "labels": ids, "pixel_values": pixels[:3]}, 4, "train")


def test_example_data_trains_only_on_labelled_tokens():
    ids = IDS[:64 * 16].view(64, 16)
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt with no loss
    model = models.EffLLMForCausalLM(models.config("test"))
    r = train(model, {"input_ids": ids, "labels": labels}, {"input_ids": ids[:8], "labels": labels[:8]},
              TrainConfig(steps=4, batch_size=4, seq_len=16, eval_every=100, eval_batches=2))
    assert len(r["artifacts"]["loss_curve"]) == 4 and r["quality"]["loss"] > 0
    with pytest.raises(ValueError, match=r"input_ids and labels must both be \[N, L\]"):
        train(model, {"input_ids": ids, "labels": labels[:, :4]}, ids.view(-1), TrainConfig(steps=4, seq_len=16))


def test_training_lowers_the_loss_and_reports_metrics(tmp_path):
    torch.manual_seed(0)
    model = models.EffLLMForCausalLM(models.config("test"))
    r = train(model, IDS[:6000], IDS[6000:], TrainConfig(steps=30, batch_size=8, seq_len=32, lr=1e-2, eval_every=10,
                                                         eval_batches=2, telemetry_period_s=0.02),
              peak_flops=1e12, checkpoint_dir=tmp_path / "ckpt")
    curve = r["artifacts"]["loss_curve"]
    assert len(curve) == 30 and curve[-1] < curve[0] - 0.3
    assert [s for s, _ in r["artifacts"]["val_curve"]] == [10, 20, 30]
    m = r["metrics"]
    assert m["params"] == model.num_parameters() and m["al_s"] > 0 and m["amu_gb"] > 0
    assert m["tokens_per_s"] == pytest.approx(8 * 32 / m["al_s"], rel=1e-6)
    assert m["mfu_pct"] == pytest.approx(100 * m["tokens_per_s"] * m["flops_per_token"] / 1e12, rel=1e-6)
    assert r["quality"]["ppl"] == pytest.approx(math.exp(r["quality"]["loss"]))
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert "pcu_warning" not in r["artifacts"]


def test_cpu_memory_is_the_runs_own_and_does_not_depend_on_order():
    """On CPU a run's AMU is what its model and AdamW state hold plus what its steps add, not the process's RSS:
    two identical runs read the same (the first in a process no longer pays for lazily loaded code), and a model
    with four times the parameters reads more by about its weights and moments."""
    def run(**dims):
        torch.manual_seed(0)
        model = models.EffLLMForCausalLM(models.config("test", **dims))
        r = train(model, IDS[:6000], IDS[6000:], TrainConfig(steps=8, batch_size=8, seq_len=32, eval_every=100,
                                                             eval_batches=1, telemetry_period_s=0.02))
        return model.num_parameters(), r["metrics"], r["artifacts"]

    n, first, art = run()
    _, second, _ = run()
    n_big, big, _ = run(hidden_size=128, intermediate_size=256)
    assert art["amu_method"] == "held_bytes_plus_window_growth"
    assert first["held_gb"] == pytest.approx(3 * 4 * n / 1e9, rel=0.02)  # fp32 weights + AdamW's two moments
    assert first["held_gb"] <= first["amu_gb"] <= first["peak_mem_gb"] < first["rss_amu_gb"]
    assert second["amu_gb"] == pytest.approx(first["amu_gb"], rel=0.25, abs=0.005)
    assert big["held_gb"] - first["held_gb"] == pytest.approx(12 * (n_big - n) / 1e9, rel=0.02)


def test_pcu_above_one_is_flagged():
    """A peak below what the run achieved (a hardware study measured in a slow spell) is named in the record."""
    model = models.EffLLMForCausalLM(models.config("test"))
    with pytest.warns(UserWarning, match="exceeds the peak given"):
        r = train(model, IDS[:6000], IDS[6000:], TrainConfig(steps=3, batch_size=2, seq_len=16, eval_every=100,
                                                             eval_batches=1), peak_flops=1.0)
    assert r["metrics"]["pcu"] > 1 and "re-run the hardware study" in r["artifacts"]["pcu_warning"]


def test_non_finite_loss_stops_the_run():
    model = models.EffLLMForCausalLM(models.config("test"))
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="loss became nan at step 0"):
        train(model, IDS[:6000], IDS[6000:], TrainConfig(steps=5, batch_size=4, seq_len=16, eval_every=100))


def test_bad_train_configs():
    with pytest.raises(ValueError, match="precision must be"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="must exceed skip_steps"):
        TrainConfig(steps=2, skip_steps=2)
    with pytest.raises(ValueError, match="compile must be true/false or one of default, reduce-overhead"):
        TrainConfig(compile="max_autotune")
    assert TrainConfig(compile="max-autotune-no-cudagraphs").compile == "max-autotune-no-cudagraphs"
    model = models.EffLLMForCausalLM(models.config("test"))
    with pytest.raises(ValueError, match="seq_len 5000 is longer than the train data"):
        train(model, IDS[:4000], IDS[4000:], TrainConfig(steps=5, seq_len=5000))


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, ffn):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(HELPER), str(single), ffn], env=env, check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(HELPER), str(double), ffn], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(double.read_text())
    assert a["processes"] == 1 and b["processes"] == 2
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["val"] == pytest.approx(a["val"], rel=1e-4)


def test_compile_takes_a_mode(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.append(mode) or model)
    model = torch.nn.Linear(2, 2)
    assert compiled(model, False) is model and seen == []
    compiled(model, True), compiled(model, "max-autotune-no-cudagraphs")
    assert seen == [None, "max-autotune-no-cudagraphs"]


def test_a_progress_bar_per_run_with_loss_and_tokens_per_second(capsys):
    model = models.EffLLMForCausalLM(models.config("test"))
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=16, eval_every=1000, log_every=3, progress_desc="attention gqa")
    result = train(model, IDS[:4000], IDS[4000:], cfg)
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("attention gqa: 100%") and "6/6" in last and "loss=" in last and "tok_s=" in last
    assert f"loss={result['artifacts']['loss_curve'][-1]:.3f}" in last  # the latest step's loss
    train(models.EffLLMForCausalLM(models.config("test")), IDS[:4000], IDS[4000:],
          TrainConfig(steps=4, batch_size=2, seq_len=16, eval_every=1000, progress=False))
    quiet = capsys.readouterr().err
    assert "step/s" not in quiet and "s/step" not in quiet and "%|" not in quiet


def test_a_tracked_run_is_read_back_from_its_tensorboard_event_file(tmp_path):
    """accelerate's TensorBoard tracker: the run's params, loss every log_every steps, validation loss and final
    metrics, read back from the event file with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from effllm_utils.engine import tracking

    model = models.EffLLMForCausalLM(models.config("test"))
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=16, eval_every=1000, log_every=2, progress=False)
    run = tracking.Tracking(tmp_path / "tb", "tiny-gqa-seed0", tracking.parse("tensorboard"),
                            config={"lr": 0.001, "spec": {"attention": "gqa"}, "scales": [1, 2]})
    result = train(model, IDS[:4000], IDS[4000:], cfg, tracking=run)
    events = list((tmp_path / "tb" / "tiny-gqa-seed0").rglob("events.out.tfevents.*"))
    assert events, list((tmp_path / "tb").rglob("*"))
    ea = EventAccumulator(str(events[0].parent))
    ea.Reload()
    loss = ea.Scalars("train/loss")
    curve = result["artifacts"]["loss_curve"]
    assert [e.step for e in loss] == [2, 4, 6]
    assert [e.value for e in loss] == pytest.approx([curve[1], curve[3], curve[5]], rel=1e-6)
    assert ea.Scalars("val/loss")[-1].value == pytest.approx(result["quality"]["loss"], rel=1e-6)
    assert ea.Scalars("metrics/tokens_per_s")[-1].value == pytest.approx(result["metrics"]["tokens_per_s"], rel=1e-6)
    assert tracking.flat(run.config) == {"lr": 0.001, "spec/attention": "gqa", "scales": "[1, 2]"}
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'"):
        tracking.parse("tensorbord")
    from effllm_utils.studies import registry

    for study in ("attention", "peft", "lvm", "vlm"):  # every study's run and --dry-run check it before anything runs
        with pytest.raises(ValueError, match="unknown tracker 'tensorbord'"):
            registry.check(study, {"trackers": "tensorbord"})
        with pytest.raises(ValueError, match="unknown tracker 'tensorbord'"):
            registry.run(study, "tiny", {"trackers": "tensorbord"})
    assert tracking.parse("none") == () and tracking.parse("") == ()
