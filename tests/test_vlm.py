"""The LLaVA-style VLM: data grounded in the image, forward with and without an adapter, merging, the study (micro)."""
import pytest
import torch

from effllm_utils.data import imagesets
from effllm_utils.engine import adapters, suite
from effllm_utils.models import hub
from effllm_utils.report import views
from effllm_utils.studies import vlm

SPEC = {"source": "suite", "dims": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128},
        "pretrain_steps": 3, "pretrain_lr": 0.003, "pretrain_seq_len": 32, "pretrain_batch_size": 4,
        "encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                    "patch_size": 2}, "encoder_steps": 3, "encoder_lr": 0.003, "align_steps": 3, "align_lr": 0.01}
P = dict(device="auto", methods=["full", "lora"], models={"micro": SPEC}, vocab_size=512, rank=4, alpha=8,
         target_modules=["q_proj", "v_proj"], freeze_fraction=0.5, loraplus_lr_ratio=16.0, pissa_init="pissa",
         lr_full=1e-3, lr_adapter=3e-3, steps=3, batch_size=4, grad_accum=1, seq_len=96, warmup_steps=1,
         eval_every=1000, eval_batches=1, precision="auto", compile=False, seed=0, accuracy_images=12)


@pytest.fixture
def built(outputs):
    return suite.suite_vlm("tiny", "micro", SPEC, P, "cpu")


def test_descriptions_are_grounded_in_the_image():
    blank, full = -torch.ones(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    assert imagesets.stroke_words(torch.cat([blank, full])) == ["thin", "bold"]
    assert imagesets.answer(7, "bold") == "seven, bold strokes."


def test_examples_hold_every_image_token_and_train_on_the_answer_only(built):
    model, tok, info = built
    n = info["n_image_tokens"]
    assert n == 17 and model.config.image_seq_length == 17  # 16 patches + CLS
    ex, meta = imagesets.digit_examples("validation", tok, n, P["seq_len"])
    image_id = tok.convert_tokens_to_ids(imagesets.IMAGE_TOKEN)
    assert ex["pixel_values"].shape == (len(meta["digit"]), 1, 8, 8)
    assert bool(((ex["input_ids"] == image_id).sum(1) == n).all())
    first = ex["labels"][0][ex["labels"][0] != -100]
    assert tok.decode(first).startswith(imagesets.WORDS[int(meta["digit"][0])])
    with pytest.raises(ValueError, match="seq_len 20 is too short for 17 image tokens"):
        imagesets.digit_examples("validation", tok, n, 20)


def test_llava_keeps_the_backbone_logits_and_the_adapter_merges(built):
    model, tok, info = built
    ex, meta = imagesets.digit_examples("validation", tok, info["n_image_tokens"], P["seq_len"])
    batch = {"input_ids": ex["input_ids"][:3], "pixel_values": ex["pixel_values"][:3]}
    model.eval()
    with torch.no_grad():
        base = model(**batch).logits
    assert base.shape == (3, P["seq_len"], len(tok))
    peft_model, _, _ = adapters.apply_method(model, "lora", P | {"target_modules": vlm._language_targets(["q_proj",
                                                                                                          "v_proj"])},
                                             task_type=None, modules_to_save=["multi_modal_projector"])
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and not any("vision_tower" in n for n in names)  # adapters on the language model only
    assert any("multi_modal_projector" in n for n in names)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)  # a trained adapter
        adapted = peft_model(**batch).logits
        merged = peft_model.merge_and_unload()(**batch).logits
    assert not torch.allclose(adapted, base, atol=1e-4)
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_vlm_study_end_to_end(outputs):
    recs = vlm.run_study("vlm", "tiny", P)
    assert [(r.technique, r.status) for r in recs] == [("full", "ok"), ("lora", "ok")], [r.error for r in recs]
    full, lora = recs
    assert 0.0 <= full.quality["digit_acc"] <= 1.0 and full.quality["loss"] > 0
    assert lora.metrics["trainable_params"] < full.metrics["trainable_params"] < full.metrics["base_params"]
    assert full.quality["frozen_head_floor"] is None and full.artifacts["frozen_head_floor_reason"] == \
        "full trains the head"
    assert 0.0 < lora.quality["frozen_head_floor"] < lora.quality["loss"]  # a bound the adapter cannot go below
    t = views.vlm_table("tiny")
    assert t[views.VLM_COLUMNS["frozen_head_floor"]].isna().tolist() == [True, False]
    assert list(t["method"]) == ["full", "lora"] and t["efficiency score"].between(0, 1).all()
    assert {"vlm.csv", "vlm_micro.png"} <= {p.name for p in views.vlm_figures("tiny")}


def test_vlm_on_a_pretrained_packaged_language_model(tiny_package, outputs):
    """The vlm's language model named by `language_model` (a packaged GGUF model here, SmolLM2 at the small profile)
    instead of the suite's pretrained backbone: it enters LLaVA as it is (a Llama), with the image token added."""
    spec = {"source": "suite", "language_model": "tiny-gguf"} | {k: SPEC[k] for k in suite.VLM_ENCODER_KEYS}
    recs = vlm.run_study("vlm", "tiny", P | {"methods": ["lora"], "models": {"gguf-vlm": spec}})
    assert [(r.technique, r.status) for r in recs] == [("lora", "ok")], [r.error for r in recs]
    base = recs[0].artifacts["base"]["base"]  # the vlm's base: the language model's provenance
    assert base["package"] == "tiny-gguf-pkg==0.0.1" and recs[0].quality["loss"] > 0
    with pytest.raises(ValueError, match="a suite model needs align_lr"):
        vlm.run_study("vlm", "tiny", P | {"models": {"bad": {k: v for k, v in spec.items() if k != "align_lr"}}})


def test_hub_model_missing_is_one_clear_error(tmp_path):
    with pytest.raises(hub.ModelUnavailable, match="could not be loaded .* the gpu profile needs the Hugging Face Hub"):
        hub.hub_vlm(str(tmp_path / "no-such-model"), "gpu")


def _local_llava(path):
    """A LLaVA-1.5-style checkpoint created here (CLIP encoder, Llama text model, LlavaProcessor with a chat
    template), saved like a Hub download: the gpu/paper code path, exercised offline."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from effllm_utils import data

    tok = data.tokenizer(1024)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                             crop_size={"height": 16, "width": 16}),
                          tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=template)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=4),
                      text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
                      vision_feature_layer=-2, image_seq_length=16)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    proc.save_pretrained(path)
    return path


def test_hub_path_on_a_local_llava_checkpoint(outputs, tmp_path):
    """The gpu/paper path (AutoModelForImageTextToText + AutoProcessor + chat template) end to end on a locally
    created LLaVA-1.5-style checkpoint: examples through the processor, adapters on the language model only."""
    path = str(_local_llava(tmp_path / "llava"))
    model, proc = hub.hub_vlm(path, "gpu")
    ex, info = imagesets.hub_examples("validation", proc, 64)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert ex["pixel_values"].shape[1:] == (3, 16, 16) and bool(((ex["input_ids"] == image_id).sum(1) == 16).all())
    answer = ex["labels"][0][ex["labels"][0] != -100]
    assert proc.tokenizer.decode(answer).startswith(imagesets.WORDS[int(info["digit"][0])])
    Q = P | {"methods": ["lora", "freeze"], "models": {"local-llava": {"source": path}}}
    recs = vlm.run_study("vlm", "gpu", Q | {"device": "cpu"})
    assert [(r.technique, r.status) for r in recs] == [("lora", "ok"), ("freeze", "ok")], [r.error for r in recs]
    lora, freeze = recs
    assert 0 <= lora.quality["digit_acc"] <= 1 and lora.quality["loss"] > 0
    assert lora.metrics["trainable_params"] < freeze.metrics["trainable_params"] < lora.metrics["base_params"]
    assert lora.artifacts["base"] == {"source": path}
