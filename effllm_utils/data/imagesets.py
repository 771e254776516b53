"""Image data: scikit-learn's 8x8 digits (offline), Hub image datasets and image folders, as tensors in [-1, 1].
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


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


class ImageSet(SimpleNamespace):
    """Images [N, C, H, W] in [-1, 1] with class labels, split into train and validation (`measure.fid.image_fid`
    scores samples against them: digits-FID for the digits, Inception FID otherwise; `fid_features` names which)."""


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
    from effllm_utils import check_choices

    check_choices([dataset], IMAGE_DATASETS, "lvm dataset")
    if dataset == "digits":
        if image_size not in (0, 8):
            raise ValueError("digits are 8x8: set image_size to 0 or 8")
        (xt, yt), (xv, yv) = digits("train", seed), digits("validation", seed)
        return ImageSet(name="digits", x_train=xt, y_train=yt, x_val=xv, y_val=yv, classes=10, size=8, channels=1,
                        fid_features="digits-FID (suite classifier)")
    import datasets

    from effllm_utils.data import DatasetUnavailable

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


# -- the vlm study's task: which digit an image shows, answered in words --------------------------------------


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION = "Which digit is this?"
IMAGE_TOKEN = "<image>"


# -- data ----------------------------------------------------------------------------------------------------------

def stroke_words(images: torch.Tensor) -> list[str]:
    """'thin', 'medium' or 'bold' from the ink of each image [N, 1, 8, 8] in [-1, 1] (thresholds: the terciles of
    all 1,797 digits, so a description depends on its image only)."""

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
    from effllm_utils import data

    x, y = digits(split, seed)
    strokes = stroke_words(x)
    prompt = IMAGE_TOKEN * n_image_tokens + "\n" + QUESTION
    ex = data.sft_examples([(prompt, answer(int(d), s)) for d, s in zip(y, strokes)], tok, seq_len)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if len(ex["input_ids"]) != len(x) or not bool(((ex["input_ids"] == image_id).sum(1) == n_image_tokens).all()):
        raise ValueError(f"seq_len {seq_len} is too short for {n_image_tokens} image tokens, the question and the "
                         f"answer; raise seq_len")
    return ex | {"pixel_values": x}, {"digit": y, "stroke": strokes}


def hub_examples(split: str, proc, seq_len: int, seed: int = 0) -> tuple[dict, dict]:
    """The digits task through a checkpoint's own processor and chat template (RGB images resized by the
    processor); the prompt carries no loss."""
    import numpy as np
    from PIL import Image


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

