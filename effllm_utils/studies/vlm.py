"""The vlm study: PEFT methods on a LLaVA-style vision-language model answering which digit an image shows.
"""
from __future__ import annotations

from typing import Any

import torch

from effllm_utils import check_choices
from effllm_utils.core import progress, runs
from effllm_utils.core.runtime import resolve_device, seed_everything
from effllm_utils.data.imagesets import answer, digit_examples, hub_examples
from effllm_utils.engine import adapters, suite, tracking
from effllm_utils.engine.suite import suite_vlm
from effllm_utils.models.hub import hub_vlm

ADAPTER_KEYS = ("rank", "alpha", "target_modules", "freeze_fraction", "loraplus_lr_ratio", "pissa_init")


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


def run_study(study: str, profile: str, P: dict[str, Any], force: bool = False) -> list[runs.RunRecord]:
    from effllm_utils.engine.adapters import LORA_METHODS, METHODS, apply_method, method_lr
    from effllm_utils.engine.train import TrainConfig

    check_choices(P["methods"], METHODS, "fine-tuning method(s)")
    suite.check_model_specs(P["models"], vlm=True)
    device = resolve_device(profile, P["device"])
    records, floors = [], {}
    tick = progress.Stages(len(P["models"]) * len(P["methods"]))
    for name, spec in P["models"].items():
        run_params = {k: P[k] for k in P if k not in ("methods", "models", "trackers")} | {"model": spec,
                                                                                          "device": device}
        for method in P["methods"]:
            tick(f"{method} on {name}, seed {P['seed']}")

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
                    floors[name] = adapters.frozen_head_floor(base, va["labels"], device=device)
                floor, why = floors[name] if method in LORA_METHODS else (None, f"{method} trains the head")
                adapter_p = P | {"target_modules": _language_targets(P["target_modules"])}
                model, optimizer, info = apply_method(base, method, adapter_p, task_type=None,
                                                      modules_to_save=["multi_modal_projector"])
                for pname, p in model.named_parameters():  # LLaVA-1.5: the vision encoder stays frozen (peft
                    if "vision_tower" in pname:  # froze it already for the adapter methods, so LoRA+'s groups hold
                        p.requires_grad_(False)  # no encoder weight)
                lr = method_lr(method, P["lr_full"], P["lr_adapter"])
                cfg = TrainConfig.from_params(P, lr=lr, weight_decay=0.0, progress_desc=f"vlm {name} {method}")
                track = tracking.for_run(profile, "vlm", f"{name}-{method}-seed{P['seed']}-lr{lr:.3g}", P,
                                         run_params | {"method": method, "lr": lr})
                result = adapters.train_method(model, method, n_params, optimizer, tr, va, cfg, profile, device,
                                               P["precision"], tracking=track)
                result["quality"]["digit_acc"] = digit_accuracy(model, va, va_info, tok, device, P["accuracy_images"])
                result["quality"]["frozen_head_floor"] = floor  # the eval loss no head-frozen method can go below
                if why:
                    result["artifacts"]["frozen_head_floor_reason"] = why
                result["artifacts"].update(method_info=info, base=base_info, model=name)
                return result

            records.append(runs.execute("vlm", method, profile, run_params, fn, scale=name, force=force))
    return records
