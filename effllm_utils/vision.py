"""Vision: a class-conditional Diffusion Transformer (DiT) built from the backbone's attention and feed-forward
modules, trained with rectified flow on scikit-learn's digits ("digits-FID") or, for gpu/paper, an image dataset
through `datasets` (CIFAR-10 from the Hub, or a local image folder) scored with the standard Inception FID.

DiT (Peebles & Xie 2023): patchify, fixed 2-D sin-cos position embedding, timestep and class embeddings summed into
the conditioning vector, adaLN-Zero blocks (every block's modulation and the final layer start at zero, so the
network starts as the identity), unpatchify. Each block's attention is `ATTENTION_CLASSES[attention]` and its
feed-forward the backbone's SwiGLU or MoE, built from an `EffLLMConfig`, so MHA/GQA/MQA/MLA/NSA and MoE are exactly
the modules the language studies measure — here with full (bidirectional) attention over the patches; NSA then
selects among all blocks of the image and its window covers the last `nsa_window` patches.

Objective: rectified flow (Liu et al. 2023): x_t = (1 - t) x0 + t e, the network predicts v = e - x0; sampling
integrates dx/dt = v from t = 1 (noise) to 0 with Euler steps and classifier-free guidance (10% of labels are dropped
to a null class in training).

digits-FID: the Frechet distance between features of real and generated images, where the features are the
penultimate layer of a small classifier trained here on the digits. It is NOT Inception FID and is named "digits-FID"
everywhere; the real-vs-real distance (two halves of the held-out images) is reported beside it for scale.
Other datasets use torchmetrics' FrechetInceptionDistance (Inception-v3 pool features, torch-fidelity's weights;
`pip install -e '.[vision]'`); where that network cannot be loaded the run is still recorded, with FID None and the
reason (`fid_unavailable`).
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models.config import EffLLMConfig
from .models.modeling import ATTENTION_CLASSES, MLP, MoE


def digits(split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits scaled to [-1, 1] as [N, 1, 8, 8], with labels; a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'validation'")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    idx = order[:cut] if split == "train" else order[cut:]
    return x[idx], y[idx]


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (half the channels per axis)."""
    def one(pos, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float32) / (d // 2))
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    return torch.cat([one(ys.reshape(-1), dim // 2), one(xs.reshape(-1), dim // 2)], 1)


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * 1000 * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, cfg: EffLLMConfig, i: int):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = ATTENTION_CLASSES[cfg.attention](cfg, i)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = MoE(cfg) if cfg.ffn == "moe" else MLP(d, cfg.intermediate_size)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c, positions, allowed):
        s1, g1, b1, s2, g2, b2 = self.ada(c).chunk(6, dim=-1)
        x = x + b1[:, None] * self.attn(_modulate(self.norm1(x), s1, g1), positions, None, allowed, None, None)
        h = self.mlp(_modulate(self.norm2(x), s2, g2))
        h, aux = h if isinstance(h, tuple) else (h, None)
        return x + b2[:, None] * h, aux


class DiT(nn.Module):
    """Class-conditional DiT on [B, C, H, W] images; `forward(input_ids=images, labels=classes)` returns the flow
    loss (so `train.train` trains it unchanged)."""

    def __init__(self, cfg: EffLLMConfig, image_size: int = 8, patch: int = 2, channels: int = 1, n_classes: int = 10,
                 label_dropout: float = 0.1):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        d, self.cfg, self.p, self.C, self.n_classes = cfg.hidden_size, cfg, patch, channels, n_classes
        self.grid, self.label_dropout = image_size // patch, label_dropout
        self.config = SimpleNamespace(vocab_size=n_classes, use_cache=False, to_dict=lambda: {
            "dit": True, "image_size": image_size, "patch": patch, **cfg.to_dict()})
        self.patch_embed = nn.Conv2d(channels, d, patch, patch)
        self.register_buffer("pos", sincos_2d(self.grid, d), persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embed = nn.Embedding(n_classes + 1, d)  # the last row is the null class (classifier-free guidance)
        self.blocks = nn.ModuleList(DiTBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, patch * patch * channels)
        for lin in (self.final_ada[1], self.out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for block in self.blocks:  # the backbone's initialisation for the shared modules
            for m in block.modules():
                if isinstance(m, nn.Linear) and m is not block.ada[1]:
                    nn.init.normal_(m.weight, std=cfg.initializer_range)
            if isinstance(block.mlp, MoE):
                nn.init.normal_(block.mlp.gate.weight, std=cfg.initializer_range)
                nn.init.normal_(block.mlp.experts.gate_up_proj, std=cfg.initializer_range)
                nn.init.normal_(block.mlp.experts.down_proj, std=cfg.initializer_range)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)
        c = self.t_embed(timestep_embedding(t).to(x.dtype)) + self.y_embed(y)
        T = h.shape[1]
        positions = torch.full((B, T), T - 1, device=x.device)  # bidirectional: every patch "sees" the whole image
        allowed = torch.ones(1, 1, T, T, dtype=torch.bool, device=x.device)
        aux = h.new_zeros(())
        for block in self.blocks:
            h, a = block(h, c, positions, allowed)
            aux = aux + (a if a is not None else 0)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        h = self.out(_modulate(self.final_norm(h), shift, scale))  # [B, T, p*p*C]
        g, p = self.grid, self.p
        v = h.view(B, g, g, p, p, self.C).permute(0, 5, 1, 3, 2, 4).reshape(B, self.C, g * p, g * p)
        self._aux = aux
        return v

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, use_cache: bool = False, **kwargs):
        x0, y = input_ids, labels
        if self.training and self.label_dropout:
            y = torch.where(torch.rand(y.shape, device=y.device) < self.label_dropout, self.n_classes, y)
        t = torch.rand(x0.shape[0], device=x0.device)
        e = torch.randn_like(x0)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * e
        loss = F.mse_loss(self.velocity(xt, t, y).float(), (e - x0).float())
        if self.cfg.ffn == "moe":
            loss = loss + self.cfg.router_aux_loss_coef * self._aux / self.cfg.num_hidden_layers
        return SimpleNamespace(loss=loss)

    @torch.no_grad()
    def sample(self, y: torch.Tensor, steps: int = 20, guidance: float = 1.5, generator=None) -> torch.Tensor:
        """Euler integration of the flow from noise (t=1) to images (t=0), classifier-free guided; in [-1, 1]."""
        g = self.grid * self.p
        x = torch.randn(len(y), self.C, g, g, generator=generator).to(y.device)
        null = torch.full_like(y, self.n_classes)
        for i in range(steps, 0, -1):
            t = torch.full((len(y),), i / steps, device=y.device)
            v_c, v_u = self.velocity(x, t, y), self.velocity(x, t, null)
            x = x - (v_u + guidance * (v_c - v_u)) / steps
        return x.clamp(-1, 1)


# -- digits-FID ---------------------------------------------------------------------------------------------------

class DigitsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))


_CLASSIFIER: dict[int, tuple[DigitsClassifier, float]] = {}


def digits_classifier(seed: int = 0) -> tuple[DigitsClassifier, float]:
    """The feature network of digits-FID: an MLP trained on the training split (deterministic, ~1 s), and its
    validation accuracy. Kept in memory for the process."""
    if seed not in _CLASSIFIER:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = DigitsClassifier()
        x, y = digits("train", seed)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        with torch.enable_grad():  # callers (digits_fid) may be inside no_grad
            _fit(net, opt, x, y, g)
        xv, yv = digits("validation", seed)
        with torch.no_grad():
            acc = (net(xv).argmax(-1) == yv).float().mean().item()
        _CLASSIFIER[seed] = (net.eval(), acc)
    return _CLASSIFIER[seed]


def _fit(net, opt, x, y, g, steps: int = 400):
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets [N, D]."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    eps = 1e-6 * np.eye(a.shape[1])  # ReLU features leave singular covariances; the usual FID offset
    s1, s2 = np.cov(a, rowvar=False) + eps, np.cov(b, rowvar=False) + eps
    covmean = linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@torch.no_grad()
def digits_fid(images: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> float:
    """digits-FID between two image sets [N, 1, 8, 8] in [-1, 1] (not Inception FID)."""
    net, _ = digits_classifier(seed)
    fa = net.features(images.float().cpu()).numpy().astype(np.float64)
    fb = net.features(reference.float().cpu()).numpy().astype(np.float64)
    return frechet_distance(fa, fb)


# -- image datasets and their FID ----------------------------------------------------------------------------------

class FeatureNetUnavailable(RuntimeError):
    """The feature network of a FID (Inception-v3) cannot be loaded here; the message says what to install or copy."""


@torch.no_grad()
def inception_fid(images: torch.Tensor, reference: torch.Tensor, device: str = "cpu") -> float:
    """The standard FID (Inception-v3 pool features, torchmetrics' FrechetInceptionDistance over torch-fidelity's
    weights) between two image sets [N, C, H, W] in [-1, 1]; grey images are repeated to three channels."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise FeatureNetUnavailable("Inception FID needs torchmetrics and torch-fidelity: "
                                    "pip install -e '.[vision]'") from None
    try:
        fid = FrechetInceptionDistance(feature=2048, normalize=True).to(device)
    except Exception as e:  # noqa: BLE001 - weights missing and not downloadable: one line
        raise FeatureNetUnavailable(f"Inception-v3 weights for FID could not be loaded ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:160]}); torch-fidelity fetches them on first use "
                                    f"where github.com is reachable, into torch.hub.get_dir()") from None
    for imgs, real in ((reference, True), (images, False)):
        for chunk in imgs.split(256):
            chunk = ((chunk.float() + 1) / 2).clamp(0, 1).to(device)
            fid.update(chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk, real=real)
    return float(fid.compute())


class ImageSet(SimpleNamespace):
    """Images [N, C, H, W] in [-1, 1] with class labels, split into train and validation, and the FID that scores
    samples against them: digits-FID for the digits, Inception FID otherwise (`fid_features` names which)."""

    def fid(self, images: torch.Tensor, reference: torch.Tensor, seed: int, device: str) -> float:
        if self.name == "digits":
            return digits_fid(images, reference, seed)
        return inception_fid(images, reference, device)


# Hub image datasets: key -> (Hub path, image column, label column, train split, validation split, classes)
HUB_IMAGES = {"cifar10": ("uoft-cs/cifar10", "img", "label", "train", "test", 10)}
IMAGE_DATASETS = ("digits", *HUB_IMAGES, "imagefolder")


def _to_tensor(images, size: int) -> torch.Tensor:
    """PIL images -> [N, 3, size, size] in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size))) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def image_set(dataset: str, seed: int = 0, data_files: str = "", image_size: int = 0,
              max_images: int = 0) -> ImageSet:
    """The lvm study's images: `digits` (scikit-learn, offline, 8x8 grey), `cifar10` (the Hub's uoft-cs/cifar10,
    32x32 colour; `data_files`: a local folder in the Hub dataset's layout instead), or `imagefolder` (`data_files`
    is a folder of class subfolders; 10% held out). image_size: resize (0: the dataset's own); max_images: cap the
    training images (0: all). A dataset that cannot be loaded is data.DatasetUnavailable with one line."""
    from . import check_choices

    check_choices([dataset], IMAGE_DATASETS, "lvm dataset")
    if dataset == "digits":
        if image_size not in (0, 8):
            raise ValueError("digits are 8x8: set image_size to 0 or 8")
        (xt, yt), (xv, yv) = digits("train", seed), digits("validation", seed)
        return ImageSet(name="digits", x_train=xt, y_train=yt, x_val=xv, y_val=yv, classes=10, size=8, channels=1,
                        fid_features="digits-FID (suite classifier)")
    import datasets

    from .data import DatasetUnavailable

    try:
        if dataset == "imagefolder" or data_files:
            if not data_files or not Path(data_files).is_dir():
                raise ValueError(f"lvm dataset {dataset!r}: data_files must be a folder of images "
                                 f"(class subfolders), got {data_files!r}")
            ds = datasets.load_dataset("imagefolder", data_dir=data_files)
        else:
            ds = datasets.load_dataset(HUB_IMAGES[dataset][0])
    except (ConnectionError, OSError, FileNotFoundError) as e:
        raise DatasetUnavailable(
            f"lvm dataset {dataset!r} could not be loaded: {type(e).__name__}: {str(e).splitlines()[0][:200]} — "
            f"run with access to the Hugging Face Hub, pre-download it into $HF_HOME, or pass a local folder as "
            f"data_files") from None
    img_col, lab_col, tr, va, classes = HUB_IMAGES.get(dataset, ("image", "label", "train", "test", None))
    if dataset == "imagefolder" or img_col not in ds[next(iter(ds))].column_names:
        img_col, lab_col = "image", "label"
    if va not in ds:  # one split only: hold out 10%
        full = ds[tr if tr in ds else next(iter(ds))].train_test_split(test_size=0.1, seed=seed)
        ds, tr, va = full, "train", "test"
    if classes is None:
        classes = ds[tr].features[lab_col].num_classes
    train, val = ds[tr], ds[va]
    if max_images:
        train = train.shuffle(seed=seed).select(range(min(max_images, len(train))))
        val = val.select(range(min(max(max_images // 5, 1), len(val))))
    size = image_size or train[0][img_col].size[0]
    return ImageSet(name=dataset, x_train=_to_tensor(train[img_col], size), y_train=torch.tensor(train[lab_col]),
                    x_val=_to_tensor(val[img_col], size), y_val=torch.tensor(val[lab_col]), classes=classes,
                    size=size, channels=3, fid_features="Inception-v3 FID (torchmetrics)")


_IMAGES: dict[tuple, ImageSet] = {}


def study_images(P: dict) -> ImageSet:
    """image_set for a study's params, kept for the process (every technique sees the same tensors)."""
    key = (P["dataset"], P["seed"], P.get("data_files", ""), P.get("image_size", 0), P.get("max_images", 0))
    if key not in _IMAGES:
        _IMAGES[key] = image_set(*key)
    return _IMAGES[key]


# -- the lvm study ------------------------------------------------------------------------------------------------

TRAIN_KEYS = ("steps", "batch_size", "grad_accum", "lr", "warmup_steps", "eval_every", "eval_batches", "precision",
              "compile", "seed")
# fine-tuning tasks: a new image domain for a DiT pretrained on the digits (same ten classes)
FINETUNE_TASKS = {"mirror": lambda x: x.flip(-1),  # left-right mirrored digits
                  "negative": lambda x: -x}  # white on black instead of black on white


def _pretrain(P: dict, dims: dict, spec: dict, device: str, profile: str):
    """(trained DiT, train.train's result) for one (scale, technique) on the study's images."""
    import dataclasses

    from . import metrics
    from .pretrain import device_peak
    from .runtime import seed_everything
    from .train import TrainConfig, train

    seed_everything(P["seed"])
    imgs = study_images(P)
    model = _dit(P, dims, spec, imgs).to(device)
    xt, yt, xv, yv = imgs.x_train, imgs.y_train, imgs.x_val, imgs.y_val
    T = (imgs.size // P["patch"]) ** 2
    fpt = metrics.training_flops_per_token(dataclasses.replace(model.cfg.shape(), lm_head=False), T)
    peak, source = device_peak(profile, device, P["precision"])
    result = train(model, {"input_ids": xt, "labels": yt}, {"input_ids": xv, "labels": yv},
                   TrainConfig(seq_len=T, **{k: P[k] for k in TRAIN_KEYS}), flops_per_token=fpt, peak_flops=peak)
    result["artifacts"]["peak_flops_source"] = source
    return model, result


def _dit(P: dict, dims: dict, spec: dict, imgs: ImageSet) -> DiT:
    if imgs.size % P["patch"]:
        raise ValueError(f"patch {P['patch']} does not divide the {imgs.size}x{imgs.size} images of {imgs.name}")
    cfg = EffLLMConfig(**({"vocab_size": 1, "position": "none"} | dims | spec))
    return DiT(cfg, image_size=imgs.size, patch=P["patch"], channels=imgs.channels, n_classes=imgs.classes)


def _checkpoint(profile: str, scale: str, technique: str, run_params: dict):
    from . import outputs_dir, runs

    return outputs_dir(profile) / "checkpoints" / "dit" / f"{scale}-{technique}-{runs.params_hash(run_params)}"


def _save(model, path) -> None:
    from safetensors.torch import save_file

    from . import runs

    with runs.atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))


def _score(model, P: dict, reference: torch.Tensor, device: str) -> dict:
    """FID (digits-FID on the digits, Inception FID otherwise) of `fid_samples` class-balanced samples against
    `reference`, with the real-vs-real scale; FID None with the reason where its feature network is missing."""
    imgs = study_images(P)
    model.eval()
    y = torch.arange(P["fid_samples"], device=device) % imgs.classes
    g = torch.Generator().manual_seed(P["seed"])
    gen = torch.cat([model.sample(chunk, P["sample_steps"], P["guidance"], g) for chunk in y.split(500)])
    half = len(reference) // 2
    out = {"samples": gen[:20].float().cpu().tolist(), "fid_unavailable": None}
    try:
        out["fid"] = imgs.fid(gen, reference, P["seed"], device)
        out["fid_real_vs_real"] = imgs.fid(reference[:half], reference[half:], P["seed"], device)
    except FeatureNetUnavailable as e:
        out.update(fid=None, fid_real_vs_real=None, fid_unavailable=str(e))
    if imgs.name == "digits":
        out["classifier_acc"] = digits_classifier(P["seed"])[1]
    return out


def _pretrain_params(P: dict, dims: dict, spec: dict, device: str) -> dict:
    skip = ("techniques", "scales") + tuple(k for k in P if k.startswith(("finetune_", "diffusers_"))
                                            or k in FINETUNE_KEYS)
    return {k: P[k] for k in P if k not in skip} | {"dims": dims, "spec": spec, "device": device}


def run_lvm(profile: str, P: dict, force: bool = False) -> list:
    """Pretrain a DiT per (scale, technique) on the study's images, sample, and record FID (digits-FID on the
    digits) with the efficiency metrics (the trained DiTs are kept under checkpoints/dit/ for the fine-tuning part)."""
    from . import pretrain, runs
    from .runtime import resolve_device

    pretrain.check_specs(P)  # a typo in a technique stops here, not after the first DiTs trained
    device = resolve_device(profile, P["device"])
    imgs = study_images(P)  # the dataset loads (or stops with one line) before anything trains
    records = []
    for scale, dims in P["scales"].items():
        for technique, spec in P["techniques"].items():
            run_params = _pretrain_params(P, dims, spec, device)

            def fn(dims=dims, spec=spec, technique=technique, run_params=run_params, scale=scale):
                model, result = _pretrain(P, dims, spec, device, profile)
                _save(model, _checkpoint(profile, scale, technique, run_params))
                q = _score(model, P, imgs.x_val, device)
                result["quality"] = {"loss": result["quality"]["loss"]} | {
                    k: q[k] for k in q if k not in ("samples", "fid_unavailable")}
                result["artifacts"].update(fid_features=imgs.fid_features, samples=q["samples"],
                                           fid_unavailable=q["fid_unavailable"], dataset=imgs.name)
                return result

            records.append(runs.execute("lvm", technique, profile, run_params, fn, scale=scale, force=force))
    return records


# -- PEFT on the DiT ----------------------------------------------------------------------------------------------

_BEFORE: dict[tuple, float] = {}  # digits-FID of a base DiT on a new domain, per process
FINETUNE_KEYS = ("rank", "alpha", "target_modules", "freeze_fraction", "loraplus_lr_ratio", "pissa_init")


def dit_base(profile: str, P: dict, scale: str, device: str) -> DiT:
    """The pretrained DiT of technique P['finetune_base'] at `scale`: the lvm pretraining run's checkpoint, trained
    (without a record) and stored when it is missing."""
    from safetensors.torch import load_file

    technique = P["finetune_base"]
    if technique not in P["techniques"]:
        raise ValueError(f"finetune_base {technique!r} is not one of the lvm techniques {list(P['techniques'])}")
    dims, spec = P["scales"][scale], P["techniques"][technique]
    path = _checkpoint(profile, scale, technique, _pretrain_params(P, dims, spec, device))
    if not (path / "model.safetensors").is_file():
        model, _ = _pretrain(P, dims, spec, device, profile)
        _save(model, path)
    model = _dit(P, dims, spec, study_images(P))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device)


def finetune_config(P: dict, method: str, tokens_per_image: int):
    """TrainConfig of a fine-tuning run of the lvm study (DiT or SD3): its finetune_* steps and learning rates."""
    from .finetune import method_lr
    from .train import TrainConfig

    return TrainConfig(**{k: P[k] for k in TRAIN_KEYS} | {
        "steps": P["finetune_steps"], "lr": method_lr(method, P["finetune_lr_full"], P["finetune_lr_adapter"]),
        "weight_decay": 0.0, "seq_len": tokens_per_image,
        "warmup_steps": min(P["warmup_steps"], P["finetune_steps"] // 5)})


def run_lvm_finetune(profile: str, P: dict, force: bool = False) -> list:
    """Fine-tune the pretrained DiT on a new image domain (P['finetune_task']) with each PEFT method of the
    fine-tuning study (finetune.apply_method); record the flow loss, digits-FID against the new domain and the
    efficiency metrics. Records: study lvm, technique = the method, scale '<scale>-ft'."""
    from . import check_choices, runs
    from .finetune import METHODS, apply_method, train_method
    from .runtime import resolve_device, seed_everything

    device = resolve_device(profile, P["device"])
    imgs = study_images(P)
    check_choices(P["finetune_methods"], METHODS, "fine-tuning method(s)")
    if P["finetune_task"] not in FINETUNE_TASKS:
        raise ValueError(f"unknown finetune_task {P['finetune_task']!r}; choose one of {', '.join(FINETUNE_TASKS)}")
    shift = FINETUNE_TASKS[P["finetune_task"]]
    xt, yt, xv, yv = shift(imgs.x_train), imgs.y_train, shift(imgs.x_val), imgs.y_val
    records = []
    for scale, dims in P["scales"].items():
        for method in P["finetune_methods"]:
            run_params = _pretrain_params(P, dims, P["techniques"][P["finetune_base"]], device) | {
                k: P[k] for k in P if k.startswith("finetune_") or k in FINETUNE_KEYS}

            def fn(scale=scale, method=method, run_params=run_params):
                seed_everything(P["seed"])
                base = dit_base(profile, P, scale, device)
                n_params = sum(p.numel() for p in base.parameters())
                key = (profile, scale, runs.params_hash(run_params))
                if key not in _BEFORE:  # the pretrained DiT on the new domain: the same for every method
                    _BEFORE[key] = _score(base, P, xv, device)["fid"]
                before = _BEFORE[key]
                base.train()
                model, optimizer, info = apply_method(base, method, P | {"lr_adapter": P["finetune_lr_adapter"]},
                                                      task_type=None)
                cfg = finetune_config(P, method, (imgs.size // P["patch"]) ** 2)
                result = train_method(model, method, n_params, optimizer, {"input_ids": xt, "labels": yt},
                                      {"input_ids": xv, "labels": yv}, cfg, profile, device, P["precision"])
                q = _score(model, P, xv, device)
                result["quality"] = {"loss": result["quality"]["loss"], "fid_before": before} | {
                    k: q[k] for k in q if k not in ("samples", "fid_unavailable")}
                result["artifacts"].update(method_info=info, samples=q["samples"],
                                           fid_features=imgs.fid_features, task=P["finetune_task"],
                                           fid_unavailable=q["fid_unavailable"], dataset=imgs.name)
                return result

            records.append(runs.execute("lvm", method, profile, run_params, fn, scale=f"{scale}-ft", force=force))
    return records


def _sample_grid(fig, recs) -> None:
    grid = fig.subplots(len(recs), 10, squeeze=False)
    for i, r in enumerate(recs):
        for j in range(10):
            img = np.array(r.artifacts["samples"][j])  # [C, H, W] (older records: [H, W]) in [-1, 1]
            img = img[0] if img.ndim == 3 and img.shape[0] == 1 else img
            if img.ndim == 3:
                grid[i][j].imshow(((img.transpose(1, 2, 0) + 1) / 2).clip(0, 1))
            else:
                grid[i][j].imshow(img, cmap="gray_r", vmin=-1, vmax=1)
            grid[i][j].set_axis_off()
        grid[i][0].set_title(r.technique, fontsize=7, loc="left")


def lvm_tables(profile: str) -> dict:
    """{'lvm': Table 10 layout (pretraining, per technique), 'lvm_peft': Table 11 layout (PEFT on the DiT, with the
    efficiency score over AMU, PCU, AL, ST, AEC within each scale)} as DataFrames, from the records."""
    import pandas as pd

    from . import runs
    from .finetune import METHODS, with_efficiency_score

    recs = runs.load_summary(profile, "lvm")  # repeats (other seeds) averaged
    pre = [r for r in recs if not r.scale.endswith("-ft")]
    ft = [r for r in recs if r.scale.endswith("-ft")]
    out = {}
    # the FID's name follows its features: digits-FID on the digits, FID (Inception) otherwise
    fid = "digits-FID" if all(r.artifacts.get("fid_features", "digits").startswith("digits") for r in recs) \
        else "FID (Inception)"
    columns = {"technique": "technique", "scale": "scale", "runs": "runs", "fid": fid, "fid_se": f"{fid} s.e.",
               "fid_real_vs_real": f"{fid} real vs real", "loss": "loss", "amu_gb": "AMU (GB)", "al_s": "AL (s/iter)",
               "tt": "TT (tokens/param/s)", "aec_w": "AEC (W)", "pcu": "PCU"}
    if pre:
        out["lvm"] = runs.select_columns(pd.DataFrame(runs.table_rows(pre, ("fid",))), columns)
    if ft:
        order = {m: i for i, m in enumerate(METHODS)}
        ft.sort(key=lambda r: (r.scale, order.get(r.technique, 99)))
        columns = {"technique": "method", "scale": "scale", "task": "task", "runs": "runs", "loss": "loss",
                   "fid": fid, "fid_se": f"{fid} s.e.", "fid_before": f"{fid} before",
                   "fid_real_vs_real": f"{fid} real vs real", "trainable_params": "trainable params",
                   "amu_gb": "AMU (GB)", "al_s": "AL (s/iter)", "st": "ST (samples/param/s)", "aec_w": "AEC (W)",
                   "pcu": "PCU", "efficiency_score": "efficiency score"}
        rows = [row | {"task": r.artifacts.get("task")} for r, row in zip(ft, runs.table_rows(ft, ("fid",)))]
        out["lvm_peft"] = runs.select_columns(with_efficiency_score(pd.DataFrame(rows), "scale"), columns)
    return out


def lvm_figures(profile: str, study: str = "lvm") -> list:
    """Tables 10 and 11 (CSV/MD/TeX); per part a radar and a grid of samples (digits 0-9 per technique)."""
    import matplotlib.pyplot as plt

    from . import plotting, runs
    from .pretrain import write_table

    tables = lvm_tables(profile)
    paths = []
    for name, df in tables.items():
        paths += write_table(df, profile, name)
    recs = runs.load_summary(profile, "lvm")
    plotting.use_style()
    for name, title, keys in (
            ("lvm", "DiT pretraining", ("fid", "amu_gb", "al_s", "tt", "aec_w", "pcu")),
            ("lvm_peft", "PEFT on the DiT", ("fid", "loss", "amu_gb", "al_s", "st", "aec_w", "pcu"))):
        part = [r for r in recs if r.scale.endswith("-ft") == (name == "lvm_peft")]
        if not part:
            continue
        fig = plt.figure(figsize=(12, 4), layout="constrained")
        ax = fig.add_subplot(1, 2, 1, projection="polar")  # the first scale (tiny has one)
        table = {r.technique: {**r.quality, **r.metrics} for r in part if r.scale == part[0].scale}
        present = [k for k in keys if all(table[t].get(k) is not None for t in table)]
        plotting.radar(ax, table, present)
        fid = "digits-FID" if part[0].artifacts.get("fid_features", "digits").startswith("digits") else "Inception"
        ax.set_title(f"{title}, {part[0].scale} (1 = best; FID is {fid})", fontsize=9)
        _sample_grid(fig.add_subfigure(fig.add_gridspec(1, 2)[0, 1]), [r for r in part if r.scale == part[0].scale])
        paths += plotting.savefig(fig, name, profile)
        plt.close(fig)
    return paths
