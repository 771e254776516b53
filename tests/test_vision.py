"""The DiT built from the backbone's modules, its sampler, digits-FID, and the lvm study end to end (micro)."""
import numpy as np
import pytest
import torch

from effllm_utils import data, models
from effllm_utils.core import aggregate
from effllm_utils.data import imagesets
from effllm_utils.engine import adapters
from effllm_utils.engine.train import TrainConfig, train
from effllm_utils.measure import fid
from effllm_utils.models.dit import DiT
from effllm_utils.models.modeling import MLAttention, MoE, NSAttention
from effllm_utils.report import views
from effllm_utils.studies import lvm

DIMS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=1, position="none", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            nsa_block_size=4, nsa_num_selected=2, nsa_window=8, num_local_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32)


def dit(**overrides):
    torch.manual_seed(0)
    return DiT(models.EffLLMConfig(**(DIMS | overrides)), image_size=8, patch=2)


def test_digits_split_and_range():
    x, y = imagesets.digits("train")
    xv, yv = imagesets.digits("validation")
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xv) == 1797 and x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="unknown split 'test'"):
        imagesets.digits("test")


def test_dit_uses_the_backbone_modules_and_starts_as_zero_velocity():
    assert isinstance(dit(attention="mla").blocks[0].attn, MLAttention)
    assert isinstance(dit(attention="nsa").blocks[0].attn, NSAttention)
    assert isinstance(dit(ffn="moe").blocks[0].mlp, MoE)
    m = dit()
    v = m.velocity(torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([0, 1, 10]))
    assert v.shape == (3, 1, 8, 8) and torch.count_nonzero(v) == 0  # adaLN-Zero: the output layer starts at zero


def test_sampler_gives_images_of_the_right_shape_and_range():
    imgs = dit().sample(torch.arange(10), steps=4, guidance=1.5, generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (10, 1, 8, 8) and imgs.min() >= -1 and imgs.max() <= 1


@pytest.mark.parametrize("overrides", [{}, {"attention": "nsa"}, {"ffn": "moe"}, {"attention": "mla"}])
def test_dit_trains_through_the_shared_loop(overrides):
    x, y = imagesets.digits("train")
    m = dit(**overrides)
    r = train(m, {"input_ids": x, "labels": y}, {"input_ids": x[:64], "labels": y[:64]},
              TrainConfig(steps=30, batch_size=32, seq_len=16, lr=3e-3, warmup_steps=2, eval_every=1000,
                          eval_batches=1))
    curve = r["artifacts"]["loss_curve"]
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 and r["metrics"]["tt"] > 0


def test_digits_fid_real_vs_real_is_small_and_noise_is_large():
    fid._CLASSIFIER.clear()  # digits_fid trains the feature net on first use, from inside torch.no_grad
    xv, _ = imagesets.digits("validation")
    half = len(xv) // 2
    real = fid.digits_fid(xv[:half], xv[half:])
    net, acc = fid.digits_classifier()
    assert acc > 0.9  # the feature network does recognise digits
    noise = fid.digits_fid(torch.rand(half, 1, 8, 8) * 2 - 1, xv[half:])
    assert real < 0.1 * noise and noise > 10 * max(real, 1e-6)
    assert fid.digits_fid(xv, xv) == pytest.approx(0.0, abs=1e-6)


def test_lvm_study_end_to_end(outputs):
    P = dict(device="auto", techniques={"mqa": {"attention": "mqa"}, "moe": {"ffn": "moe"}},
             scales={"micro": {k: DIMS[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "intermediate_size")}},
             dataset="digits", patch=2, steps=5, batch_size=32, grad_accum=1, lr=3e-3, warmup_steps=1,
             eval_every=1000, eval_batches=1, precision="auto", compile=False, seed=0, fid_samples=40,
             sample_steps=2, guidance=1.5)
    recs = lvm.run_lvm("tiny", P)
    assert [(r.technique, r.status) for r in recs] == [("mqa", "ok"), ("moe", "ok")], [r.error for r in recs]
    q = recs[0].quality
    assert q["fid"] > q["fid_real_vs_real"] >= 0 and len(recs[0].artifacts["samples"]) == 20
    names = {p.name for p in views.lvm_figures("tiny")}
    assert {"lvm.csv", "lvm.png", "lvm.pdf"} <= names
    with pytest.raises(ValueError, match=r"unknown lvm dataset \['imagenet_256'\]; choose from digits, cifar10, "
                                         r"imagefolder"):
        lvm.run_lvm("tiny", P | {"dataset": "imagenet_256"})
    with pytest.raises(ValueError, match=r"techniques\['moe4'\]: unknown config key 'num_experts'"):
        lvm.run_lvm("tiny", P | {"techniques": {"moe4": {"ffn": "moe", "num_experts": 4}}}, force=True)
    assert len(aggregate.load_runs("tiny", "lvm")) == 2  # nothing ran, nothing was recorded


def _image_folder(root, classes=3, per_class=12, size=12):
    """A local image dataset in `imagefolder` layout: one subfolder per class, RGB PNGs of a class colour + noise."""
    from PIL import Image

    g = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(g.normal(60 + 80 * c, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


def test_image_datasets_through_datasets(tmp_path, monkeypatch):
    """gpu/paper image data: a local image folder (the Hub datasets' offline twin) loads as [N, 3, H, W] in [-1, 1]
    with labels and a held-out 10%; the Hub dataset offline and a missing folder are one clear line each."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = _image_folder(tmp_path / "imgs")
    imgs = imagesets.image_set("imagefolder", data_files=str(root), image_size=8)
    assert imgs.x_train.shape[1:] == (3, 8, 8) and len(imgs.x_train) + len(imgs.x_val) == 36 and len(imgs.x_val) >= 3
    assert -1 <= float(imgs.x_train.min()) and float(imgs.x_train.max()) <= 1 and imgs.classes == 3
    assert sorted(set(imgs.y_train.tolist())) == [0, 1, 2] and imgs.fid_features.startswith("Inception")
    # a class's images keep their colour: class 2 is brighter than class 0
    assert imgs.x_train[imgs.y_train == 2].mean() > imgs.x_train[imgs.y_train == 0].mean() + 0.5
    with pytest.raises(ValueError, match="data_files must be a folder of images"):
        imagesets.image_set("imagefolder")
    with pytest.raises(data.DatasetUnavailable, match="lvm dataset 'cifar10' could not be loaded: .*data_files"):
        imagesets.image_set("cifar10")


def test_lvm_on_an_image_folder_records_fid_unavailable_with_the_reason(outputs, tmp_path, monkeypatch):
    """Colour images train the same DiT; without Inception's weights (or torchmetrics) FID is None with the reason,
    the efficiency metrics are still recorded."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = _image_folder(tmp_path / "imgs")
    P = dict(device="auto", techniques={"gqa": {"attention": "gqa"}},
             scales={"micro": {k: DIMS[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "intermediate_size")}},
             dataset="imagefolder", data_files=str(root), image_size=8, max_images=0, patch=2, steps=4,
             batch_size=8, grad_accum=1, lr=3e-3, warmup_steps=1, eval_every=1000, eval_batches=1, precision="auto",
             compile=False, seed=0, fid_samples=12, sample_steps=2, guidance=1.5)
    monkeypatch.setattr(fid, "inception_fid", lambda *a, **k: (_ for _ in ()).throw(
        fid.FeatureNetUnavailable("Inception FID needs torchmetrics and torch-fidelity")))
    (rec,) = lvm.run_lvm("tiny", P)
    assert rec.status == "ok", rec.error
    assert rec.quality["fid"] is None and rec.artifacts["fid_unavailable"].startswith("Inception FID needs")
    assert rec.metrics["al_s"] > 0 and rec.quality["loss"] > 0
    assert np.array(rec.artifacts["samples"]).shape[1:] == (3, 8, 8)
    names = {p.name for p in views.lvm_figures("tiny")}
    assert "lvm.png" in names


def test_lvm_peft_on_the_dit(outputs):
    dims = {k: DIMS[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                 "intermediate_size")}
    P = dict(device="auto", techniques={"mha": {"attention": "mha"}}, scales={"micro": dims}, dataset="digits", patch=2,
             steps=5, batch_size=32, grad_accum=1, lr=3e-3, warmup_steps=1, eval_every=1000, eval_batches=1,
             precision="auto", compile=False, seed=0, fid_samples=40, sample_steps=2, guidance=1.5,
             finetune_methods=["freeze", "lora"], finetune_base="mha", finetune_task="mirror", finetune_steps=4,
             finetune_lr_full=1e-3, finetune_lr_adapter=3e-3, rank=4, alpha=8, target_modules=["q_proj", "v_proj"],
             freeze_fraction=0.5, loraplus_lr_ratio=16.0, pissa_init="pissa")
    recs = lvm.run_lvm_finetune("tiny", P)  # no pretraining record yet: the base DiT is trained and cached
    assert [(r.technique, r.scale, r.status) for r in recs] == [("freeze", "micro-ft", "ok"),
                                                                ("lora", "micro-ft", "ok")]
    freeze, lora = recs
    assert freeze.quality["fid_before"] == lora.quality["fid_before"] > 0  # the same base on the same new domain
    assert freeze.artifacts["method_info"] == {"frozen_layers": 1, "total_layers": 2}
    assert lora.metrics["trainable_params"] < freeze.metrics["trainable_params"] < lora.metrics["base_params"]
    # freeze trains the upper block and the output layers, not the bottom block or the embeddings
    base = lvm.dit_base("tiny", P, "micro", "cpu")
    model, _, _ = adapters.apply_method(base, "freeze", P)
    trained = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
               for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"blocks.1", "final_ada", "out"}
    tables = views.lvm_tables("tiny")
    assert list(tables["lvm_peft"]["method"]) == ["freeze", "lora"]
    assert tables["lvm_peft"]["efficiency score"].between(0, 1).all()
    with pytest.raises(ValueError, match="unknown finetune_task 'rotate'"):
        lvm.run_lvm_finetune("tiny", P | {"finetune_task": "rotate"})


def test_inception_fid_without_torchmetrics_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # as on a machine without the [vision] extra
    with pytest.raises(fid.FeatureNetUnavailable, match=r"pip install -e '\.\[vision\]'"):
        fid.inception_fid(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))


def test_dit_technique_sizes_follow_the_width_not_tinys():
    """MLA's head dims and latent rank and a MoE's expert width are derived from the scale where the technique
    leaves them out (issue 25: DiT-XL had tiny's 96-wide experts beside a 3,072 dense FFN)."""
    from effllm_utils import models
    from effllm_utils.studies.lvm import scaled_overrides

    tiny = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 176}
    assert scaled_overrides(tiny, {"attention": "mla"}) == {
        "attention": "mla", "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 32}
    xl = models.scale_dims("dit-xl")
    assert scaled_overrides(xl, {"attention": "mla"})["kv_lora_rank"] == 2 * 1152 // 16
    moe = {"attention": "mha", "ffn": "moe", "num_local_experts": 4, "num_experts_per_tok": 2}
    assert scaled_overrides(xl, moe)["moe_intermediate_size"] == 3072 // 2
    assert scaled_overrides(tiny, moe)["moe_intermediate_size"] == 88
    assert scaled_overrides(xl, moe | {"moe_intermediate_size": 96})["moe_intermediate_size"] == 96  # given: kept
    assert scaled_overrides(tiny, {"attention": "gqa"}) == {"attention": "gqa"}
