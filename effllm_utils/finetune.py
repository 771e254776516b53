"""The fine-tuning (PEFT) study: Full, Freeze, LoRA, LoRA+, RSLoRA, DoRA, PiSSA (paper Tables 7-8, Figure 4).

Every adapter method goes through `peft`: LoRA (`LoraConfig`), RSLoRA (`use_rslora`), DoRA (`use_dora`), PiSSA
(`init_lora_weights="pissa"`, or "pissa_niter_<n>" — the fast randomised SVD — at scale) and LoRA+ (peft's
`create_loraplus_optimizer`: the B matrices get `loraplus_lr_ratio` x the learning rate of A). `freeze` trains only
the layers above the first `freeze_fraction` of the stack (the paper froze the first 8 layers of 16-layer models;
0.5 scales that to any depth), the final norm and the head; `full` trains everything.

Models: `source: suite` pretrains the backbone on the embedded corpus once (cached checkpoint, reused by every method
and re-trained only when its params change); any other source is a Hub id or local path for `from_pretrained`.
Datasets: `milton` (language modelling on the held-out Milton domain), `dialogue` (instruction-style pairs from the
plays, loss on the response only), or a Hub SFT set (`openo1_sft`, `medical_o1`).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from . import check_choices, check_keys, config_args, data, metrics, outputs_dir, runs
from .runtime import resolve_device, seed_everything

METHODS = ("full", "freeze", "lora", "lora_plus", "rslora", "dora", "pissa")
LORA_METHODS = ("lora", "lora_plus", "rslora", "dora", "pissa")
TRAIN_KEYS = ("steps", "batch_size", "grad_accum", "seq_len", "warmup_steps", "eval_every", "eval_batches",
              "precision", "compile", "seed")


class ModelUnavailable(RuntimeError):
    """A Hub checkpoint needed by a profile cannot be loaded."""


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


# -- models and data ---------------------------------------------------------------------------------------------

def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


SUITE_REQUIRED = ("source", "dims", "pretrain_steps", "pretrain_lr")
SUITE_OPTIONAL = ("pretrain_seq_len", "pretrain_batch_size")  # the study's seq_len and batch_size by default
VLM_SUITE_KEYS = ("pretrain_seq_len", "pretrain_batch_size", "encoder", "encoder_steps", "encoder_lr",
                  "align_steps", "align_lr")  # all required for the vlm study's suite model


def check_model_specs(models: dict[str, Any], vlm: bool = False) -> None:
    """Every entry of a study's `models` names real keys, before the first run: a suite model (`source: suite`)
    its pretraining recipe (and, for the vlm study, its encoder and alignment), a Hub model only its `source`. A
    misspelt key (`pretrain_stpes`) would otherwise be ignored or fail deep in a run."""
    from .models import config_fields_check

    for name, spec in models.items():
        where = f"models[{name!r}]"
        if not isinstance(spec, dict) or "source" not in spec:
            raise ValueError(f"{where}: needs a 'source' (suite, a Hub id or a local path), got {spec!r}")
        if spec["source"] != "suite":
            check_keys(spec, ("source",), where, "Hub-model key")
            continue
        required = SUITE_REQUIRED + (VLM_SUITE_KEYS if vlm else ())
        check_keys(spec, required if vlm else SUITE_REQUIRED + SUITE_OPTIONAL, where, "suite-model key")
        if missing := [k for k in required if k not in spec]:
            raise ValueError(f"{where}: a suite model needs {', '.join(missing)}")
        config_fields_check(spec["dims"], f"{where}['dims']")
        if vlm:
            from transformers import CLIPVisionConfig

            check_keys(spec["encoder"], config_args(CLIPVisionConfig, ("image_size", "num_channels")),
                       f"{where}['encoder']", "CLIPVisionConfig field")  # the digits fix those two


def load_base(profile: str, name: str, spec: dict[str, Any], P: dict[str, Any], device: str):
    """(model, tokenizer, info) for one entry of P['models']."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec["source"] != "suite":
        try:
            tok = AutoTokenizer.from_pretrained(spec["source"])
            model = AutoModelForCausalLM.from_pretrained(spec["source"], dtype=torch.float32)
        except OSError as e:
            raise ModelUnavailable(f"model {spec['source']!r} could not be loaded ({str(e).splitlines()[0][:160]}); "
                                   f"the {profile} profile needs the Hugging Face Hub or a copy in $HF_HOME") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model, tok, {"source": spec["source"]}
    from . import models  # noqa: F401 - registers the backbone with the Auto classes
    from .pretrain import build_model
    from .train import TrainConfig, train

    tok = data.tokenizer(P["vocab_size"])
    # the pretraining recipe: the spec's pretrain_* values, else the study's seq_len and batch_size
    seq_len, batch = spec.get("pretrain_seq_len", P["seq_len"]), spec.get("pretrain_batch_size", P["batch_size"])
    key = {k: spec[k] for k in ("dims", "pretrain_steps", "pretrain_lr")} | {"vocab": P["vocab_size"],
                                                                            "seq_len": seq_len, "batch_size": batch}
    # keyed by the recipe, not the model's name: every study and name with the same recipe (the peft, quantization
    # and vlm studies' tiny models) shares one pretrained checkpoint
    ckpt = outputs_dir(profile) / "checkpoints" / "base" / f"suite-{_hash(key)}"
    if not (ckpt / "model.safetensors").is_file():  # pretrain once; every method and dataset reuses it
        seed_everything(0)
        model, fpt, _ = build_model(spec["dims"], len(tok), {}, seq_len)
        cfg = TrainConfig(steps=spec["pretrain_steps"], batch_size=batch, seq_len=seq_len,
                          lr=spec["pretrain_lr"], warmup_steps=min(10, spec["pretrain_steps"] // 10),
                          eval_every=10**9, eval_batches=P["eval_batches"])
        result = train(model.to(device), data.token_ids("train", tok), data.token_ids("validation", tok), cfg,
                       flops_per_token=fpt)
        with runs.atomic_dir(ckpt) as tmp:
            model.save_pretrained(tmp)
            (tmp / "pretrain.json").write_text(json.dumps(result["quality"]))
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    return model, tok, {"source": "suite", "checkpoint": str(ckpt),
                        "pretrain": json.loads((ckpt / "pretrain.json").read_text())}


_DATASETS: dict[tuple, Any] = {}


def load_dataset(name: str, tok, P: dict[str, Any]):
    """(train, validation) in the forms train.train takes; kept in memory for the other methods of the study."""
    key = (name, tok.name_or_path, len(tok), P["seq_len"], P["hub_examples"])
    if key not in _DATASETS:
        _DATASETS.clear()  # one dataset at a time: the study loops methods inside datasets
        _DATASETS[key] = _load_dataset(name, tok, P)
    return _DATASETS[key]


def _load_dataset(name: str, tok, P: dict[str, Any]):
    if name == "milton":
        return data.token_ids("train", tok, "milton"), data.token_ids("validation", tok, "milton")
    if name == "dialogue":
        return (data.sft_examples(data.dialogue_pairs("train"), tok, P["seq_len"]),
                data.sft_examples(data.dialogue_pairs("validation"), tok, P["seq_len"]))
    ds = data.load_hub_dataset(name, limit=P["hub_examples"])
    spec = data.HUB_DATASETS[name]
    pairs = [(row[spec.prompt], "\n\n".join(str(row[k]) for k in spec.responses if row.get(k))) for row in ds]
    cut = max(1, int(len(pairs) * 0.95))
    return data.sft_examples(pairs[:cut], tok, P["seq_len"]), data.sft_examples(pairs[cut:], tok, P["seq_len"])


def train_method(model, method: str, n_params: int, optimizer, train_data, val_data, cfg, profile: str,
                 device: str, precision: str) -> dict[str, Any]:
    """`train.train` for one fine-tuning method with the study's accounting (shared by peft, vlm, lvm's DiT and SD3
    parts): analytic FLOPs (2 per parameter per token forward; the backward only above the first trainable weight
    for freeze), the device peak for PCU, trainable and base parameter counts, and ST (samples/s/param of the
    whole model)."""
    from .pretrain import device_peak
    from .train import train

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fpt = finetune_flops_per_token(n_params, trainable, n_params if method != "freeze" else trainable)
    peak, source = device_peak(profile, device, precision)
    result = train(model.to(device), train_data, val_data, cfg, flops_per_token=fpt, peak_flops=peak,
                   optimizer=optimizer)
    m = result["metrics"]
    m["trainable_params"], m["base_params"] = trainable, n_params
    m["st"] = metrics.st(m["samples_per_s"], n_params, 1.0)
    result["artifacts"]["peak_flops_source"] = source
    return result


# -- the study ---------------------------------------------------------------------------------------------------

def run_study(profile: str, P: dict[str, Any], force: bool = False) -> list[runs.RunRecord]:
    from .train import TrainConfig

    check_choices(P["methods"], METHODS, "fine-tuning method(s)")
    check_model_specs(P["models"])
    device = resolve_device(profile, P["device"])
    records = []
    for model_name, spec in P["models"].items():
        for dataset in P["datasets"]:
            for method in P["methods"]:
                run_params = {k: P[k] for k in P if k not in ("methods", "models", "datasets")} | {
                    "model": spec, "dataset": dataset, "device": device}

                def fn(model_name=model_name, spec=spec, dataset=dataset, method=method):
                    seed_everything(P["seed"])
                    base, tok, base_info = load_base(profile, model_name, spec, P, device)
                    train_data, val_data = load_dataset(dataset, tok, P)
                    n_params = sum(p.numel() for p in base.parameters())
                    model, optimizer, info = apply_method(base, method, P)
                    cfg = TrainConfig(lr=method_lr(method, P["lr_full"], P["lr_adapter"]), weight_decay=0.0,
                                      **{k: P[k] for k in TRAIN_KEYS})
                    result = train_method(model, method, n_params, optimizer, train_data, val_data, cfg, profile,
                                          device, P["precision"])
                    result["artifacts"].update(method_info=info, base=base_info, dataset=dataset, model=model_name)
                    return result

                records.append(runs.execute("peft", method, profile, run_params, fn, scale=model_name, force=force))
    return records


# -- tables and figures (records only) ---------------------------------------------------------------------------

COLUMNS = {"scale": "model", "param.dataset": "dataset", "technique": "method", "runs": "runs",
           "train_loss": "train loss", "loss": "eval loss", "loss_se": "eval loss s.e.",
           "trainable_params": "trainable params", "amu_gb": "AMU (GB)", "peak_mem_gb": "peak mem (GB)", "pcu": "PCU",
           "al_s": "AL (s/iter)", "st": "ST (samples/param/s)", "aec_w": "AEC (W)", "energy_j": "energy (J)",
           "efficiency_score": "efficiency score"}
# table column -> record key for the fine-tuning radar charts (peft and vlm)
RADAR_COLUMNS = {"eval loss": "loss", "AMU (GB)": "amu_gb", "AL (s/iter)": "al_s", "ST (samples/param/s)": "st",
                 "AEC (W)": "aec_w", "PCU": "pcu"}
SCORE_KEYS = ("amu_gb", "pcu", "al_s", "st", "aec_w")


def with_efficiency_score(df, by: list[str] | str):
    """`df` (one row per record, record keys as columns) with `efficiency_score` computed within each group of `by`
    over SCORE_KEYS (`metrics.efficiency_score`; a key no record holds counts as not measured). The peft, vlm and
    lvm fine-tuning tables."""
    df = df.reindex(columns=list(dict.fromkeys([*df.columns, *SCORE_KEYS])))
    df["efficiency_score"] = float("nan")
    for _, idx in df.groupby(by).groups.items():
        sub = df.loc[idx]
        df.loc[idx, "efficiency_score"] = metrics.efficiency_score({k: sub[k].astype(float) for k in SCORE_KEYS})
    return df


def table(profile: str):
    """Tables 7-8 layout: one row per (model, dataset, method) with the efficiency score computed within each
    (model, dataset) group over the metrics measured there (metrics.efficiency_score)."""
    import pandas as pd

    recs = runs.load_summary(profile, "peft")  # repeats (other seeds) averaged
    if not recs:
        return pd.DataFrame(columns=list(COLUMNS.values()))
    df = pd.DataFrame(runs.table_rows(recs, ("loss",)))
    df["param.dataset"] = df["param.dataset"].astype(str)
    df = with_efficiency_score(df, ["scale", "param.dataset"])
    order = {m: i for i, m in enumerate(METHODS)}
    df = df.sort_values(["scale", "param.dataset", "technique"], key=lambda s: s.map(order) if s.name == "technique"
                        else s)
    return df[[c for c in COLUMNS if c in df]].rename(columns=COLUMNS).reset_index(drop=True)


def figures(profile: str, study: str = "peft") -> list:
    """Table (CSV/MD/TeX); per (model, dataset): efficiency-score bars (Figure 4), a radar, and a Pareto plot of
    eval loss against energy (or against latency where energy is not measurable, which the axis says)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from . import plotting
    from .pretrain import write_table

    t = table(profile)
    if t.empty:
        return []
    paths = write_table(t, profile, "peft")
    plotting.use_style()
    for (model, dataset), sub in t.groupby(["model", "dataset"], sort=False):
        methods = list(sub["method"])
        fig = plt.figure(figsize=(13, 3.8), layout="constrained")
        ax1 = fig.add_subplot(1, 3, 1)
        plotting.bar(ax1, methods, list(sub["efficiency score"]), "efficiency score (1 = best)", value_fmt="{:.2f}")
        ax1.set_title(f"{model} / {dataset}")
        ax2 = fig.add_subplot(1, 3, 2, projection="polar")
        keys = RADAR_COLUMNS
        rows = {m: {keys[c]: float(r[c]) for c in keys if c in sub and pd.notna(r[c])} for m, (_, r) in
                zip(methods, sub.iterrows())}
        present = [k for k in keys.values() if all(k in rows[m] for m in methods)]
        plotting.radar(ax2, rows, present)
        ax3 = fig.add_subplot(1, 3, 3)
        energy = sub["energy (J)"] if "energy (J)" in sub else None
        loss_se = list(sub["eval loss s.e."].astype(float)) if "eval loss s.e." in sub else None  # repeats
        if energy is not None and energy.notna().all():
            plotting.pareto(ax3, methods, list(energy), list(sub["eval loss"]), "energy (J)", "eval loss",
                            y_errors=loss_se)
        else:
            plotting.pareto(ax3, methods, list(sub["AL (s/iter)"]), list(sub["eval loss"]),
                            "AL (s/iter) — energy not measurable on this device", "eval loss", y_errors=loss_se)
        paths += plotting.savefig(fig, f"peft_{model}_{dataset}", profile)
        plt.close(fig)
    return paths
