"""Image quality: digits-FID (Frechet distance in the feature space of a small digits classifier, trained once per
process) and Inception FID (torch-fidelity / torchmetrics) for the gpu/paper image datasets.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from effllm_utils.data.imagesets import digits

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
    from effllm_utils.core import progress

    bar = progress.bar(total=len(reference) + len(images), desc="FID: Inception features", unit="image",
                       mininterval=1.0)
    for imgs, real in ((reference, True), (images, False)):
        for chunk in imgs.split(256):
            n = len(chunk)
            chunk = ((chunk.float() + 1) / 2).clamp(0, 1).to(device)
            fid.update(chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk, real=real)
            bar.update(n)
    bar.close()
    return float(fid.compute())


def image_fid(imgs, images: torch.Tensor, reference: torch.Tensor, seed: int, device: str) -> float:
    """The FID that scores samples against an image set (data.imagesets.ImageSet): digits-FID for the digits,
    Inception FID otherwise."""
    if imgs.name == "digits":
        return digits_fid(images, reference, seed)
    return inception_fid(images, reference, device)
