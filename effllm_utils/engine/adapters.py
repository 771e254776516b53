"""The fine-tuning methods (Full, Freeze, LoRA, LoRA+, RSLoRA, DoRA, PiSSA) through peft, their learning rates, the
frozen-head floor, FLOPs, and one training call shared by the peft, lvm and vlm studies.
"""
from __future__ import annotations

from typing import Any

import torch

from effllm_utils.measure import metrics

METHODS = ("full", "freeze", "lora", "lora_plus", "rslora", "dora", "pissa")
LORA_METHODS = ("lora", "lora_plus", "rslora", "dora", "pissa")


# -- methods -----------------------------------------------------------------------------------------------------

def linear_module_names(model) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_targets(model, targets: list[str] | str) -> None:
    """Every listed module name exists in `model` (or, for a regular expression as peft takes it, some module's full
    name matches it); otherwise one ValueError naming what the model has."""
    import re

    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n, _ in model.named_modules()):
            raise ValueError(f"target_modules pattern {targets!r} matches no module of {type(model).__name__}")
        return
    names = [n for n, _ in model.named_modules()]
    # peft matches a name as the module's full name or a dotted suffix of it (e.g. diffusers' "to_out.0")
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"target module(s) {missing} not found in {type(model).__name__}; its linear layers are "
                         f"{linear_module_names(model)}")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a causal LM (effllm, Qwen2, Llama, Mistral, GPT-NeoX, ...), of a LLaVA-style
    model's language model, of a DiT, or of a diffusers SD3 or Wan transformer (wrapped as
    diffusion.FlowMatchingModel)."""
    for path in ("model.layers", "gpt_neox.layers", "transformer.h", "model.decoder.layers",
                 "model.language_model.layers", "blocks", "transformer.transformer_blocks",
                 "transformer.blocks"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} for the freeze method")


def method_lr(method: str, lr_full: float, lr_adapter: float) -> float:
    """The learning rate a method trains with: the adapters' for the LoRA family, else full/freeze's."""
    return lr_adapter if method in LORA_METHODS else lr_full


def apply_method(model, method: str, P: dict[str, Any], task_type: str | None = "CAUSAL_LM",
                 modules_to_save: list[str] | None = None):
    """(model ready to train, optimizer or None, info) for one method; the learning rate is P['lr_full'] for
    full/freeze and P['lr_adapter'] for the adapter methods. task_type: peft's task (None for models that are not
    causal LMs, e.g. a DiT); modules_to_save: modules trained in full beside the adapters (e.g. a VLM's projector)."""
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(METHODS)}")
    info: dict[str, Any] = {}
    if method == "full":
        model.requires_grad_(True)
        return model, None, info
    if method == "freeze":
        # frozen: the input embeddings and the bottom `freeze_fraction` of the block stack; trained: the blocks above
        # and whatever sits after the stack (final norm, head, a DiT's output layers)
        layers = decoder_layers(model)
        n_frozen = round(P["freeze_fraction"] * len(layers))
        in_stack = {id(p) for p in layers.parameters()}
        model.requires_grad_(False)
        for layer in layers[n_frozen:]:
            layer.requires_grad_(True)
        for name, p in model.named_parameters():
            if id(p) not in in_stack and "embed" not in name:
                p.requires_grad_(True)
        info.update(frozen_layers=n_frozen, total_layers=len(layers))
        return model, None, info
    from peft import LoraConfig, get_peft_model

    check_targets(model, P["target_modules"])
    cfg = LoraConfig(r=P["rank"], lora_alpha=P["alpha"], lora_dropout=0.0, target_modules=P["target_modules"],
                     use_rslora=method == "rslora", use_dora=method == "dora", modules_to_save=modules_to_save,
                     init_lora_weights=P["pissa_init"] if method == "pissa" else True, task_type=task_type)
    model = get_peft_model(model, cfg)
    optimizer = None
    if method == "lora_plus":
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=P["lr_adapter"],
                                              loraplus_lr_ratio=P["loraplus_lr_ratio"], weight_decay=0.0)
        info["loraplus_lr_ratio"] = P["loraplus_lr_ratio"]
    return model, optimizer, info


def frozen_head_floor(model, labels: torch.Tensor, steps: int = 400, restarts: int = 3, seed: int = 0,
                      device: str | None = None):
    """(floor, reason): the lowest mean NLL of the target tokens in `labels` (-100 = no loss) that any method which
    keeps the final RMSNorm and the output head frozen (LoRA and its variants) can reach, whatever the layers below
    compute; None with the reason where the model's final norm is not an RMSNorm.

    The head sees g * x / rms(x): a vector of norm sqrt(d) in the norm's frame. For each target token t the best such
    vector is found by gradient ascent on log softmax(W (g * x))[t] over the sphere (the first start is W[t] * g, the
    others random; the best of `restarts`), so the estimate can only err high. A weakly trained head (the tiny suite
    base) caps some tokens' probability well below 1 — adapters then plateau at this floor — while a large
    pretrained head gives ~0."""
    head = model.get_output_embeddings()
    norm = getattr(model.get_decoder(), "norm", None)
    if head is None or norm is None or getattr(norm, "bias", None) is not None or norm.weight.ndim != 1:
        return None, "the final norm is not an RMSNorm (weight only) followed by the output head"
    dev = device or head.weight.device  # the search runs there (a 7B head on a GPU: seconds)
    W, g = head.weight.detach().to(dev, torch.float32), norm.weight.detach().to(dev, torch.float32)
    target = labels[..., 1:][labels[..., 1:] != -100].to(W.device)
    ids, counts = torch.unique(target, return_counts=True)
    if not len(ids):
        return None, "no target tokens"
    d, gen = W.shape[1], torch.Generator().manual_seed(seed)

    def nll(h: torch.Tensor) -> torch.Tensor:
        x = h / h.norm(dim=1, keepdim=True) * d ** 0.5
        return -torch.log_softmax((g * x) @ W.T, -1).gather(1, ids[:, None])[:, 0]

    best = torch.full((len(ids),), float("inf"), device=W.device)
    with torch.enable_grad():
        for r in range(restarts):
            start = W[ids] * g if r == 0 else torch.randn(len(ids), d, generator=gen).to(W.device)
            h = start.clone().requires_grad_(True)
            opt = torch.optim.Adam([h], lr=0.05)
            for _ in range(steps):
                opt.zero_grad()
                nll(h).sum().backward()
                opt.step()
            with torch.no_grad():
                best = torch.minimum(best, nll(h))
    return float((best * counts).sum() / counts.sum()), None


def finetune_flops_per_token(n_params: int, n_trainable: int, backward_params: int) -> float:
    """Forward 2N + activation gradients through the `backward_params` that lie above the first trainable weight
    (2 x backward_params) + weight gradients of the trainable ones (2 x n_trainable). Full fine-tuning gives 6N."""
    return 2.0 * n_params + 2.0 * backward_params + 2.0 * n_trainable


def train_method(model, method: str, n_params: int, optimizer, train_data, val_data, cfg, profile: str,
                 device: str, precision: str, tracking=None) -> dict[str, Any]:
    """`train.train` for one fine-tuning method with the study's accounting (shared by peft, vlm, lvm's DiT and SD3
    parts): analytic FLOPs (2 per parameter per token forward; the backward only above the first trainable weight
    for freeze), the device peak for PCU, trainable and base parameter counts, and ST (samples/s/param of the
    whole model). tracking: an `engine.tracking.Tracking` for the run (none: untracked)."""
    from effllm_utils.engine.train import train
    from effllm_utils.measure.hardware import device_peak

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fpt = finetune_flops_per_token(n_params, trainable, n_params if method != "freeze" else trainable)
    peak, source = device_peak(profile, device, precision)
    result = train(model.to(device), train_data, val_data, cfg, flops_per_token=fpt, peak_flops=peak,
                   optimizer=optimizer, tracking=tracking)
    m = result["metrics"]
    m["trainable_params"], m["base_params"] = trainable, n_params
    m["st"] = metrics.st(m["samples_per_s"], n_params, 1.0)
    result["artifacts"]["peak_flops_source"] = source
    return result
