"""The vlm study: a LLaVA-style vision-language model fine-tuned with the PEFT methods (paper Table 12).

The model is transformers' own `LlavaForConditionalGeneration`: a vision encoder, LLaVA-1.5's two-layer GELU projector,
and a causal LM, the image's patch features taking the place of the `<image>` tokens of the prompt.

- `source: suite` (tiny, offline): the vision encoder is a small transformers `CLIPVisionModel` pretrained here as a
  digits classifier (cached), and the language model is the suite's pretrained backbone (the peft study's cached
  checkpoint) converted to transformers' Qwen2 with a logits check (quantize.to_qwen2), with `<image>` added to its
  vocabulary. The task: scikit-learn's digits with text descriptions grounded in the image ("This is a seven written
  in bold strokes.", the stroke weight measured from the image's ink), loss on the answer only.
- any other source: a Hub id or local path of a LLaVA-1.5-style checkpoint (`AutoModelForImageTextToText` and its
  `AutoProcessor`, whose chat template builds the prompt). Qwen2.5-VL's processor packs the patches of all images
  into one tensor; such checkpoints are refused with that reason rather than mis-batched.

Methods come from the fine-tuning study (finetune.apply_method). As in LLaVA-1.5's instruction tuning the vision
encoder stays frozen for every method; `full` trains the projector and the language model, the adapter methods put
adapters on the language model's linear layers and train the projector in full (peft's modules_to_save), `freeze`
trains the upper half of the language model and the projector.

Quality: the answer loss, and digit accuracy — for each held-out image, the ten answers that differ only in the digit
word are scored by the model and the most likely one counts (no free-form generation to parse).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from . import check_choices, finetune, outputs_dir, runs
from .runtime import resolve_device, seed_everything
from .finetune import ModelUnavailable  # one exception for every missing Hub checkpoint (vlm.ModelUnavailable)

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION = "Which digit is this?"
IMAGE_TOKEN = "<image>"
TRAIN_KEYS = ("steps", "batch_size", "grad_accum", "seq_len", "warmup_steps", "eval_every", "eval_batches",
              "precision", "compile", "seed")
ADAPTER_KEYS = ("rank", "alpha", "target_modules", "freeze_fraction", "loraplus_lr_ratio", "pissa_init")


# -- data ----------------------------------------------------------------------------------------------------------

def stroke_words(images: torch.Tensor) -> list[str]:
    """'thin', 'medium' or 'bold' from the ink of each image [N, 1, 8, 8] in [-1, 1] (thresholds: the terciles of
    all 1,797 digits, so a description depends on its image only)."""
    from .vision import digits

    def ink(x):
        return ((x + 1) / 2).flatten(1).sum(1)

    every = torch.cat([digits("train")[0], digits("validation")[0]])
    lo, hi = torch.quantile(ink(every), torch.tensor([1 / 3, 2 / 3]))
    return ["thin" if v < lo else "bold" if v > hi else "medium" for v in ink(images).tolist()]


def answer(digit: int, stroke: str) -> str:
    return f"{WORDS[digit]}, {stroke} strokes."


def digit_examples(split: str, tok, n_image_tokens: int, seq_len: int, seed: int = 0) -> dict:
    """{"input_ids", "labels", "pixel_values", "digit", "stroke"}: the digits of `split` as SFT examples whose prompt
    holds `n_image_tokens` image tokens and the question, and whose answer (with the loss) describes the image."""
    from . import data
    from .vision import digits

    x, y = digits(split, seed)
    strokes = stroke_words(x)
    prompt = IMAGE_TOKEN * n_image_tokens + "\n" + QUESTION
    ex = data.sft_examples([(prompt, answer(int(d), s)) for d, s in zip(y, strokes)], tok, seq_len)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if len(ex["input_ids"]) != len(x) or not bool(((ex["input_ids"] == image_id).sum(1) == n_image_tokens).all()):
        raise ValueError(f"seq_len {seq_len} is too short for {n_image_tokens} image tokens, the question and the "
                         f"answer; raise seq_len")
    return ex | {"pixel_values": x}, {"digit": y, "stroke": strokes}


# -- models --------------------------------------------------------------------------------------------------------

def vision_encoder(profile: str, spec: dict, seed: int, device: str):
    """A transformers CLIPVisionModel pretrained here as a digits classifier (linear head on the pooled output),
    cached under checkpoints/vision/; returns (encoder, validation accuracy)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .vision import digits

    path = outputs_dir(profile) / "checkpoints" / "vision" / f"clip-{finetune._hash([spec, seed])}"
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


def build_llava(vision, text, image_token_id: int, projector_act: str = "gelu"):
    """LlavaForConditionalGeneration from a CLIP-style vision model and a transformers causal LM (weights copied):
    every feature of the encoder's last layer — the patches and the CLS token, which carries what the encoder was
    trained to classify ('full' strategy; LLaVA-1.5 drops CLS) — becomes one image token."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    n_tokens = (vision.config.image_size // vision.config.patch_size) ** 2 + 1  # the patches and CLS
    cfg = LlavaConfig(vision_config=vision.config.to_dict(), text_config=text.config.to_dict(),
                      image_token_id=image_token_id, projector_hidden_act=projector_act,
                      vision_feature_select_strategy="full", vision_feature_layer=-1, image_seq_length=n_tokens,
                      tie_word_embeddings=text.config.tie_word_embeddings)
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    return model


def suite_vlm(profile: str, name: str, spec: dict, P: dict, device: str):
    """(LLaVA model, tokenizer with <image>, info) from the suite's pretrained backbone and digits encoder, its
    projector aligned by LLaVA's stage 1 (projector-only training on the task for spec['align_steps'] steps, cached:
    every method then starts from the same aligned model)."""
    from safetensors.torch import load_file, save_file

    from .finetune import load_base
    from .quantize import to_qwen2
    from .train import TrainConfig, train

    lm, tok, base_info = load_base(profile, name, spec, P | {"seq_len": spec["pretrain_seq_len"],
                                                             "batch_size": spec["pretrain_batch_size"]}, device)
    tok = copy.deepcopy(tok)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    text = to_qwen2(lm.cpu())
    text.resize_token_embeddings(len(tok), mean_resizing=False)
    enc, enc_acc = vision_encoder(profile, spec, P["seed"], device)
    model = build_llava(enc.cpu(), text, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    n_img = model.config.image_seq_length
    path = Path(base_info["checkpoint"]).with_name(f"{name}-llava-{finetune._hash([spec, P['seq_len'], P['seed']])}")
    if not (path / "projector.safetensors").is_file():
        seed_everything(P["seed"])
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        (tr, _), (va, _) = (digit_examples(s, tok, n_img, P["seq_len"], P["seed"]) for s in ("train", "validation"))
        cfg = TrainConfig(steps=spec["align_steps"], batch_size=P["batch_size"], seq_len=P["seq_len"],
                          lr=spec["align_lr"], warmup_steps=max(1, spec["align_steps"] // 10), weight_decay=0.0,
                          eval_every=10**9, eval_batches=P["eval_batches"], seed=P["seed"])
        result = train(model.to(device), tr, va, cfg)
        with runs.atomic_dir(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in
                       model.model.multi_modal_projector.state_dict().items()}, str(tmp / "projector.safetensors"))
            (tmp / "align.json").write_text(json.dumps(result["quality"]))
    model.model.multi_modal_projector.load_state_dict(load_file(str(path / "projector.safetensors")))
    model.requires_grad_(True)
    return model.cpu(), tok, {"source": "suite", "base": base_info, "encoder_accuracy": enc_acc,
                              "n_image_tokens": n_img, "alignment": json.loads((path / "align.json").read_text())}


def hub_vlm(source: str, profile: str):
    """(model, processor) of a LLaVA-1.5-style checkpoint (Hub id or local path)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    except OSError as e:
        why = str(e).splitlines()[0][:160]
        raise ModelUnavailable(f"vision-language model {source!r} could not be loaded ({why}); "
                               f"the {profile} profile needs the Hugging Face Hub or a copy in $HF_HOME") from None
    return model, proc


def hub_examples(split: str, proc, seq_len: int, seed: int = 0) -> tuple[dict, dict]:
    """The digits task through a checkpoint's own processor and chat template (RGB images resized by the
    processor); the prompt carries no loss."""
    import numpy as np
    from PIL import Image

    from .vision import digits

    x, y = digits(split, seed)
    strokes = stroke_words(x)
    tok = proc.tokenizer
    rows = {"input_ids": [], "labels": [], "pixel_values": []}
    for img, d, s in zip(x, y.tolist(), strokes):
        pil = Image.fromarray(np.uint8((1 - (img[0].numpy() + 1) / 2) * 255)).convert("RGB")  # black ink on white
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
        enc = proc(text=prompt + answer(d, s) + (tok.eos_token or ""), images=pil, return_tensors="pt")
        if enc["pixel_values"].ndim != 4 or enc["pixel_values"].shape[0] != 1:
            shape = tuple(enc["pixel_values"].shape)
            raise ValueError(f"{type(proc).__name__} packs image patches into shape {shape}; "
                             f"only LLaVA-1.5-style processors (one [C, H, W] image per example) are supported")
        n_prompt = len(proc(text=prompt, images=pil, return_tensors="pt")["input_ids"][0])
        ids = enc["input_ids"][0][:seq_len]
        if n_prompt >= len(ids):
            raise ValueError(f"seq_len {seq_len} leaves no room for the answer after the {n_prompt}-token prompt")
        labels = ids.clone()
        labels[:n_prompt] = -100
        pad = seq_len - len(ids)
        rows["input_ids"].append(torch.nn.functional.pad(ids, (0, pad), value=tok.pad_token_id or 0))
        rows["labels"].append(torch.nn.functional.pad(labels, (0, pad), value=-100))
        rows["pixel_values"].append(enc["pixel_values"][0])
    return {k: torch.stack(v) for k, v in rows.items()}, {"digit": y, "stroke": strokes}


# -- quality -------------------------------------------------------------------------------------------------------

@torch.no_grad()
def digit_accuracy(model, examples: dict, info: dict, tok, device: str, limit: int = 200, batch: int = 50) -> float:
    """Share of held-out images whose most likely answer, among the ten that differ only in the digit word, names
    the right digit (summed answer log-likelihood)."""
    model.eval()
    n = min(limit, len(info["digit"]))
    ids, labels, pixels = examples["input_ids"][:n], examples["labels"][:n], examples["pixel_values"][:n]
    starts = (labels != -100).float().argmax(1)  # where each answer begins
    scores = torch.empty(n, 10)
    for d in range(10):
        cand_ids, cand_labels = ids.clone(), torch.full_like(labels, -100)
        for i in range(n):
            a = tok(answer(d, info["stroke"][i]))["input_ids"] + [tok.eos_token_id]
            s = int(starts[i])
            a = a[: ids.shape[1] - s]
            cand_ids[i, s: s + len(a)] = torch.tensor(a)
            cand_labels[i, s: s + len(a)] = torch.tensor(a)
        for b in range(0, n, batch):
            sl = slice(b, b + batch)
            logits = model(input_ids=cand_ids[sl].to(device), pixel_values=pixels[sl].to(device),
                           use_cache=False).logits.float()
            target = cand_labels[sl, 1:].to(device)
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
            scores[sl, d] = (logp * (target != -100)).sum(1).cpu()
    return float((scores.argmax(1) == info["digit"][:n]).float().mean())


# -- the study -----------------------------------------------------------------------------------------------------

def _language_targets(targets: list[str]) -> str:
    """peft's regular-expression form: the listed linear layers of the language model only (the vision encoder has
    q/k/v projections of the same names)."""
    return rf".*language_model.*\.({'|'.join(targets)})"


def run_study(profile: str, P: dict[str, Any], force: bool = False) -> list[runs.RunRecord]:
    from .finetune import LORA_METHODS, METHODS, apply_method, method_lr
    from .train import TrainConfig

    check_choices(P["methods"], METHODS, "fine-tuning method(s)")
    finetune.check_model_specs(P["models"], vlm=True)
    device = resolve_device(profile, P["device"])
    records, floors = [], {}
    for name, spec in P["models"].items():
        run_params = {k: P[k] for k in P if k not in ("methods", "models")} | {"model": spec, "device": device}
        for method in P["methods"]:
            def fn(name=name, spec=spec, method=method):
                seed_everything(P["seed"])
                if spec["source"] == "suite":
                    base, tok, base_info = suite_vlm(profile, name, spec, P, device)
                    n_img = base_info["n_image_tokens"]
                    (tr, _), (va, va_info) = (digit_examples(s, tok, n_img, P["seq_len"], P["seed"])
                                              for s in ("train", "validation"))
                else:
                    base, proc = hub_vlm(spec["source"], profile)
                    tok, base_info = proc.tokenizer, {"source": spec["source"]}
                    (tr, _), (va, va_info) = (hub_examples(s, proc, P["seq_len"], P["seed"])
                                              for s in ("train", "validation"))
                n_params = sum(p.numel() for p in base.parameters())
                if method in LORA_METHODS and name not in floors:  # once per model: the head is the base's
                    floors[name] = finetune.frozen_head_floor(base, va["labels"], device=device)
                floor, why = floors[name] if method in LORA_METHODS else (None, f"{method} trains the head")
                adapter_p = P | {"target_modules": _language_targets(P["target_modules"])}
                model, optimizer, info = apply_method(base, method, adapter_p, task_type=None,
                                                      modules_to_save=["multi_modal_projector"])
                for pname, p in model.named_parameters():  # LLaVA-1.5: the vision encoder stays frozen (peft
                    if "vision_tower" in pname:  # froze it already for the adapter methods, so LoRA+'s groups hold
                        p.requires_grad_(False)  # no encoder weight)
                cfg = TrainConfig(lr=method_lr(method, P["lr_full"], P["lr_adapter"]), weight_decay=0.0,
                                  **{k: P[k] for k in TRAIN_KEYS})
                result = finetune.train_method(model, method, n_params, optimizer, tr, va, cfg, profile, device,
                                               P["precision"])
                result["quality"]["digit_acc"] = digit_accuracy(model, va, va_info, tok, device, P["accuracy_images"])
                result["quality"]["frozen_head_floor"] = floor  # the eval loss no head-frozen method can go below
                if why:
                    result["artifacts"]["frozen_head_floor_reason"] = why
                result["artifacts"].update(method_info=info, base=base_info, model=name)
                return result

            records.append(runs.execute("vlm", method, profile, run_params, fn, scale=name, force=force))
    return records


# -- tables and figures (records only) -----------------------------------------------------------------------------

COLUMNS = {"scale": "model", "technique": "method", "runs": "runs", "loss": "eval loss", "loss_se": "eval loss s.e.",
           "frozen_head_floor": "frozen-head floor", "digit_acc": "digit acc", "trainable_params": "trainable params",
           "amu_gb": "AMU (GB)", "al_s": "AL (s/iter)", "st": "ST (samples/param/s)", "aec_w": "AEC (W)",
           "pcu": "PCU", "efficiency_score": "efficiency score"}


def table(profile: str):
    """Table 12 layout: one row per (model, method), the efficiency score within each model; repeats (other
    seeds) averaged, with `runs` and the eval loss's standard error where there are any."""
    import pandas as pd

    from .finetune import METHODS

    recs = runs.load_summary(profile, "vlm")
    if not recs:
        return pd.DataFrame()
    order = {m: i for i, m in enumerate(METHODS)}
    recs.sort(key=lambda r: (r.scale, order.get(r.technique, 99)))
    df = finetune.with_efficiency_score(pd.DataFrame(runs.table_rows(recs, ("loss",))), "scale")
    return runs.select_columns(df, COLUMNS)


def figures(profile: str, study: str = "vlm") -> list:
    """Table 12 (CSV/MD/TeX) and, per model, efficiency-score bars and a radar."""
    import matplotlib.pyplot as plt

    from . import plotting
    from .pretrain import write_table

    t = table(profile)
    if t.empty:
        return []
    paths = write_table(t, profile, "vlm")
    plotting.use_style()
    keys = finetune.RADAR_COLUMNS
    for model, sub in t.groupby("model", sort=False):
        fig = plt.figure(figsize=(10, 3.8), layout="constrained")
        ax1 = fig.add_subplot(1, 2, 1)
        plotting.bar(ax1, list(sub["method"]), list(sub["efficiency score"]), "efficiency score (1 = best)",
                     value_fmt="{:.2f}")
        ax1.set_title(f"vlm: {model} on digits")
        ax2 = fig.add_subplot(1, 2, 2, projection="polar")
        rows = {m: {keys[c]: float(r[c]) for c in keys if r[c] == r[c] and r[c] is not None}
                for m, (_, r) in zip(sub["method"], sub.iterrows())}
        plotting.radar(ax2, rows, [k for k in keys.values() if all(k in rows[m] for m in rows)])
        paths += plotting.savefig(fig, f"vlm_{model}", profile)
        plt.close(fig)
    return paths
