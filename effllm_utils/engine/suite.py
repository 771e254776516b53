"""The suite's own pretrained bases: the backbone pretrained once per recipe (shared by peft, quantization and vlm),
the vlm's vision encoder and LLaVA model; model specs checked key by key before any run.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from effllm_utils import check_keys, config_args, data, outputs_dir
from effllm_utils.core import provenance, runs
from effllm_utils.core.runtime import seed_everything
from effllm_utils.data.imagesets import IMAGE_TOKEN, digit_examples
from effllm_utils.engine import tracking
from effllm_utils.models import packaged
from effllm_utils.models.convert import export_qwen2
from effllm_utils.models.hub import ModelUnavailable
from effllm_utils.models.llava import build_llava

# -- models and data ---------------------------------------------------------------------------------------------

def _artifact_key(obj) -> str:
    """10 hex digits over a cached artifact's recipe `obj` and the code that builds it (this module and what it
    imports): a change to either builds the artifact again instead of reusing what other code built."""
    text = json.dumps([obj, provenance.builder_version(__name__)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


SUITE_REQUIRED = ("source", "dims", "pretrain_steps", "pretrain_lr")
SUITE_OPTIONAL = ("pretrain_seq_len", "pretrain_batch_size")  # the study's seq_len and batch_size by default
VLM_ENCODER_KEYS = ("encoder", "encoder_steps", "encoder_lr", "align_steps", "align_lr")
VLM_SUITE_KEYS = ("pretrain_seq_len", "pretrain_batch_size") + VLM_ENCODER_KEYS  # the vlm's suite model needs all


def check_model_specs(models: dict[str, Any], vlm: bool = False) -> None:
    """Every entry of a study's `models` names real keys, before the first run: a suite model (`source: suite`)
    its pretraining recipe (and, for the vlm study, its encoder and alignment), a Hub model only its `source`. A
    misspelt key (`pretrain_stpes`) would otherwise be ignored or fail deep in a run."""
    from effllm_utils.models import config_fields_check

    for name, spec in models.items():
        where = f"models[{name!r}]"
        if not isinstance(spec, dict) or "source" not in spec:
            raise ValueError(f"{where}: needs a 'source' (suite, a Hub id or a local path), got {spec!r}")
        if spec["source"] != "suite":
            check_keys(spec, ("source",), where, "Hub-model key")
            continue
        pretrained_lm = vlm and "language_model" in spec  # the vlm on a pretrained LM (e.g. smollm2-135m)
        required = (("source", "language_model") + VLM_ENCODER_KEYS if pretrained_lm else
                    SUITE_REQUIRED + (VLM_SUITE_KEYS if vlm else ()))
        check_keys(spec, required if vlm else SUITE_REQUIRED + SUITE_OPTIONAL, where, "suite-model key")
        if missing := [k for k in required if k not in spec]:
            raise ValueError(f"{where}: a suite model needs {', '.join(missing)}")
        if not pretrained_lm:
            config_fields_check(spec["dims"], f"{where}['dims']")
        if vlm:
            from transformers import CLIPVisionConfig

            check_keys(spec["encoder"], config_args(CLIPVisionConfig, ("image_size", "num_channels")),
                       f"{where}['encoder']", "CLIPVisionConfig field")  # the digits fix those two


def check_params(P: dict[str, Any], vlm: bool = False) -> None:
    """A study's `models` specs, key by key, before any run (the registry's check of peft and quantization)."""
    check_model_specs(P["models"], vlm=vlm)


def check_vlm_params(P: dict[str, Any]) -> None:
    """The vlm study's `models` specs (suite recipe, dims, the vision encoder): the registry's check."""
    check_params(P, vlm=True)


def load_base(profile: str, name: str, spec: dict[str, Any], P: dict[str, Any], device: str,
              dtype: torch.dtype = torch.float32):
    """(model, tokenizer, info) for one entry of P['models'], its weights in `dtype`."""
    from transformers import AutoModelForCausalLM

    if spec["source"] != "suite":
        return _pretrained(profile, spec["source"], dtype)
    from effllm_utils import models  # noqa: F401 - registers the backbone with the Auto classes
    from effllm_utils.engine.train import TrainConfig, train
    from effllm_utils.models.techniques import build_model

    tok = data.tokenizer(P["vocab_size"])
    # the pretraining recipe: the spec's pretrain_* values, else the study's seq_len and batch_size
    seq_len, batch = spec.get("pretrain_seq_len", P["seq_len"]), spec.get("pretrain_batch_size", P["batch_size"])
    key = {k: spec[k] for k in ("dims", "pretrain_steps", "pretrain_lr")} | {"vocab": P["vocab_size"],
                                                                            "seq_len": seq_len, "batch_size": batch}
    # keyed by the recipe and the code that builds it, not the model's name: every study and name with the same recipe
    # (the peft, quantization and vlm studies' tiny models) shares one pretrained checkpoint
    ckpt = outputs_dir(profile) / "checkpoints" / "base" / f"suite-{_artifact_key(key)}"
    if not (ckpt / "model.safetensors").is_file():  # pretrain once; every method and dataset reuses it
        seed_everything(0)
        model, fpt, _ = build_model(spec["dims"], len(tok), {}, seq_len)
        cfg = TrainConfig(steps=spec["pretrain_steps"], batch_size=batch, seq_len=seq_len,
                          lr=spec["pretrain_lr"], warmup_steps=min(10, spec["pretrain_steps"] // 10),
                          eval_every=10**9, eval_batches=P["eval_batches"], progress_desc=f"base {ckpt.name}")
        result = train(model.to(device), data.token_ids("train", tok), data.token_ids("validation", tok), cfg,
                       flops_per_token=fpt, tracking=tracking.for_run(profile, "base", ckpt.name, P, key))
        with runs.atomic_dir(ckpt) as tmp:
            model.save_pretrained(tmp)
            (tmp / "pretrain.json").write_text(json.dumps(result["quality"]))
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
    return model, tok, {"source": "suite", "checkpoint": str(ckpt),
                        "pretrain": json.loads((ckpt / "pretrain.json").read_text())}


def _pretrained(profile: str, source: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, info) of a Hub id, a local folder or a packaged model (`models.packaged`: converted once
    from its GGUF file under $EFFLLM_CACHE/packaged/), its weights in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = {"source": source}
    if packaged.is_packaged(source):
        p = packaged.PACKAGED[source]
        path = packaged.checkpoint(source)  # one converted copy, shared by every profile and the bench
        info |= {"checkpoint": str(path), "package": f"{p.package}=={p.version}", "file": p.file,
                 "license": p.license, "weights": p.weights}
        source = str(path)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as e:
        raise ModelUnavailable(f"model {source!r} could not be loaded ({str(e).splitlines()[0][:160]}); "
                               f"the {profile} profile needs the Hugging Face Hub or a copy in $HF_HOME") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, info


def base_checkpoint(profile: str, name: str, spec: dict[str, Any], P: dict[str, Any], device: str):
    """(checkpoint dir in Qwen2 format or Hub id, tokenizer, info): the suite's backbone (pretrained once, cached,
    shared with the fine-tuning study) exported to Qwen2, a packaged model's converted checkpoint, or a Hub model as it
    is."""

    model, tok, info = load_base(profile, name, spec, P, "cpu")
    if spec["source"] != "suite":
        return info.get("checkpoint", spec["source"]), tok, info
    out = Path(info["checkpoint"]).with_name(Path(info["checkpoint"]).name + "-qwen2")
    if not (out / "model.safetensors").is_file():
        with runs.atomic_dir(out) as tmp:
            export_qwen2(model, tmp, tok)
    return out, tok, info


# -- models --------------------------------------------------------------------------------------------------------

def vision_encoder(profile: str, spec: dict, seed: int, device: str):
    """A transformers CLIPVisionModel pretrained here as a digits classifier (linear head on the pooled output),
    cached under checkpoints/vision/; returns (encoder, validation accuracy)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from effllm_utils.data.imagesets import digits

    path = outputs_dir(profile) / "checkpoints" / "vision" / f"clip-{_artifact_key([spec, seed])}"
    if not (path / "model.safetensors").is_file():
        seed_everything(seed)
        enc = CLIPVisionModel(CLIPVisionConfig(image_size=8, num_channels=1, **spec["encoder"])).to(device)
        head = torch.nn.Linear(enc.config.hidden_size, 10).to(device)
        opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=spec["encoder_lr"])
        x, y = digits("train", seed)
        g = torch.Generator().manual_seed(seed)
        for _ in range(spec["encoder_steps"]):
            i = torch.randint(0, len(x), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(head(enc(x[i].to(device)).pooler_output), y[i].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        xv, yv = digits("validation", seed)
        with torch.no_grad():
            acc = (head(enc(xv.to(device)).pooler_output).argmax(-1).cpu() == yv).float().mean().item()
        with runs.atomic_dir(path) as tmp:
            enc.save_pretrained(tmp)
            (tmp / "accuracy.json").write_text(json.dumps({"validation_accuracy": acc}))
    enc = CLIPVisionModel.from_pretrained(path)
    return enc, json.loads((path / "accuracy.json").read_text())["validation_accuracy"]


def suite_vlm(profile: str, name: str, spec: dict, P: dict, device: str):
    """(LLaVA model, tokenizer with <image>, info) from the suite's pretrained backbone (or the pretrained LM named by
    spec['language_model'], e.g. smollm2-135m) and digits encoder, its
    projector aligned by LLaVA's stage 1 (projector-only training on the task for spec['align_steps'] steps, cached:
    every method then starts from the same aligned model)."""
    from safetensors.torch import load_file, save_file

    from effllm_utils.engine.train import TrainConfig, train
    from effllm_utils.models.convert import to_qwen2

    if "language_model" in spec:  # a pretrained LM (Hub id, folder or packaged model) as it is
        text, tok, base_info = _pretrained(profile, spec["language_model"])
    else:  # the suite's backbone, pretrained here, as Qwen2
        lm, tok, base_info = load_base(profile, name, spec, P | {"seq_len": spec["pretrain_seq_len"],
                                                                 "batch_size": spec["pretrain_batch_size"]}, device)
        text = to_qwen2(lm.cpu())
    tok = copy.deepcopy(tok)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    text.resize_token_embeddings(len(tok), mean_resizing=False)
    enc, enc_acc = vision_encoder(profile, spec, P["seed"], device)
    model = build_llava(enc.cpu(), text, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    n_img = model.config.image_seq_length
    # beside the suite's base; a pretrained LM's projector goes under this profile's outputs, not the shared cache
    base = (outputs_dir(profile) / "checkpoints" / "base" / name if "language_model" in spec
            else Path(base_info["checkpoint"]))
    path = base.with_name(f"{name}-llava-{_artifact_key([spec, P['seq_len'], P['seed']])}")
    if not (path / "projector.safetensors").is_file():
        seed_everything(P["seed"])
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        (tr, _), (va, _) = (digit_examples(s, tok, n_img, P["seq_len"], P["seed"]) for s in ("train", "validation"))
        cfg = TrainConfig(steps=spec["align_steps"], batch_size=P["batch_size"], seq_len=P["seq_len"],
                          lr=spec["align_lr"], warmup_steps=max(1, spec["align_steps"] // 10), weight_decay=0.0,
                          eval_every=10**9, eval_batches=P["eval_batches"], seed=P["seed"],
                          progress_desc=f"vlm {path.name} projector alignment")
        result = train(model.to(device), tr, va, cfg, tracking=tracking.for_run(profile, "vlm", path.name, P, spec))
        with runs.atomic_dir(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in
                       model.model.multi_modal_projector.state_dict().items()}, str(tmp / "projector.safetensors"))
            (tmp / "align.json").write_text(json.dumps(result["quality"]))
    model.model.multi_modal_projector.load_state_dict(load_file(str(path / "projector.safetensors")))
    model.requires_grad_(True)
    return model.cpu(), tok, {"source": "suite", "base": base_info, "encoder_accuracy": enc_acc,
                              "n_image_tokens": n_img, "alignment": json.loads((path / "align.json").read_text())}
