"""PEFT on a diffusers SD3 transformer (the lvm study's paper part), on a tiny SD3-style checkpoint created here."""
import pytest
import torch

from effllm_utils.engine import adapters
from effllm_utils.models import diffusion, hub
from effllm_utils.report import views
from effllm_utils.studies import lvm

P = dict(device="auto", dataset="digits", data_files="", image_size=0, max_images=0, seed=0, steps=3, batch_size=8,
         grad_accum=1, lr=1e-3, warmup_steps=1, eval_every=1000, eval_batches=1, precision="auto", compile=False,
         finetune_methods=["full", "freeze", "lora"], finetune_steps=3, finetune_lr_full=1e-3,
         finetune_lr_adapter=3e-3, rank=4, alpha=8, target_modules=["q_proj"], freeze_fraction=0.5,
         loraplus_lr_ratio=16.0, pissa_init="pissa", diffusers_resolution=16,
         diffusers_target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def _tiny_sd3(path):
    """transformer/ and vae/ of an SD3-style diffusers checkpoint (no text encoders), random weights."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(0)
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                          num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                          pooled_projection_dim=64, out_channels=4).save_pretrained(path / "transformer")
    AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=16).save_pretrained(path / "vae")
    return path


def test_flow_matching_loss_and_freeze_on_the_sd3_stack(tmp_path):
    transformer, vae = diffusion.load(str(_tiny_sd3(tmp_path / "sd3")), "paper")
    z = diffusion.latents(vae, torch.rand(3, 1, 8, 8) * 2 - 1, 16, "cpu")
    assert z.shape == (3, 4, 8, 8)  # grey 8x8 -> RGB 16x16 -> 4 x 8 x 8 latents
    embeds, pooled, how = diffusion.prompt_embeddings(str(tmp_path / "sd3"), ["a", "b"], transformer, "cpu")
    assert embeds.shape == (2, 1, 32) and pooled.shape == (2, 64) and how.startswith("unconditional")
    model = diffusion.FlowMatchingModel(transformer, embeds, pooled)
    loss = model(input_ids=z, labels=torch.tensor([0, 1, 0])).loss
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert transformer.transformer_blocks[0].attn.to_q.weight.grad is not None
    frozen, _, info = adapters.apply_method(model, "freeze", P | {"lr_adapter": 1e-3})
    assert info == {"frozen_layers": 1, "total_layers": 2}
    assert not any(p.requires_grad for p in frozen.transformer.transformer_blocks[0].parameters())
    assert all(p.requires_grad for p in frozen.transformer.transformer_blocks[1].parameters())


def test_sd3_peft_study_end_to_end(outputs, tmp_path):
    path = str(_tiny_sd3(tmp_path / "sd3"))
    recs = lvm.run_sd_finetune("paper", P | {"device": "cpu", "diffusers_models": {"tiny-sd3": {"source": path}}})
    assert [(r.technique, r.scale, r.status) for r in recs] == [
        ("full", "tiny-sd3-ft", "ok"), ("freeze", "tiny-sd3-ft", "ok"), ("lora", "tiny-sd3-ft", "ok")], \
        [r.error for r in recs]
    full, freeze, lora = recs
    assert lora.metrics["trainable_params"] < freeze.metrics["trainable_params"] < full.metrics["trainable_params"]
    assert all(r.quality["loss"] > 0 and r.quality["fid"] is None and r.metrics["al_s"] > 0 for r in recs)
    assert lora.artifacts["conditioning"].startswith("unconditional")

    assert set(views.lvm_tables("paper")["lvm_peft"]["method"]) == {"full", "freeze", "lora"}


def test_missing_diffusers_model_is_one_clear_line(tmp_path):
    with pytest.raises(hub.ModelUnavailable, match="could not be loaded .* the paper profile needs the Hugging "
                                                        "Face Hub"):
        diffusion.load(str(tmp_path / "nothing"), "paper")
    (tmp_path / "flux" / "transformer").mkdir(parents=True)
    (tmp_path / "flux" / "transformer" / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
    with pytest.raises(ValueError, match="transformer FluxTransformer2DModel is not supported; supported: "
                                         "SD3Transformer2DModel, WanTransformer3DModel"):
        diffusion.load(str(tmp_path / "flux"), "paper")


def _tiny_wan(path):
    """transformer/ and vae/ of a Wan 2.1-style diffusers checkpoint (no text encoder), random weights."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(0)
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                          out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
                          rope_max_seq_len=32).save_pretrained(path / "transformer")
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.1, -0.2, 0.3, 0.0],
                     latents_std=[1.5, 2.0, 1.0, 0.5]).save_pretrained(path / "vae")
    return path


def test_wan_peft_on_single_frame_clips(outputs, tmp_path):
    """Wan 2.1's video transformer fine-tunes on the study's images as one-frame clips, latents normalised per
    channel as Wan trains; freeze finds its `blocks`."""
    path = str(_tiny_wan(tmp_path / "wan"))
    transformer, vae = diffusion.load(path, "paper")
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.manual_seed(1)
    z = diffusion.latents(vae, x, 16, "cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        raw = vae.encode(torch.nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear",
                                                         align_corners=False)[:, :, None]).latent_dist.sample()
    assert z.shape == (2, 4, 1, 2, 2)
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 2.0, 1.0, 0.5]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(z * std + mean, raw)  # Wan's per-channel normalisation
    embeds, pooled, how = diffusion.prompt_embeddings(path, ["a", "b"], transformer, "cpu")
    assert embeds.shape == (2, 1, 32) and pooled is None and how.startswith("unconditional")
    recs = lvm.run_sd_finetune("paper", P | {"device": "cpu", "diffusers_models": {"tiny-wan": {"source": path}},
                                                "finetune_methods": ["freeze", "lora"]})
    assert [(r.technique, r.status) for r in recs] == [("freeze", "ok"), ("lora", "ok")], [r.error for r in recs]
    freeze, lora = recs
    assert freeze.artifacts["method_info"] == {"frozen_layers": 1, "total_layers": 2}
    assert lora.metrics["trainable_params"] < freeze.metrics["trainable_params"] < lora.metrics["base_params"]
