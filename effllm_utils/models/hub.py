"""Models from the Hugging Face Hub: one exception for every checkpoint that cannot be had, and the Hub VLM loader.
"""
from __future__ import annotations

import torch


class ModelUnavailable(RuntimeError):
    """A Hub checkpoint needed by a profile cannot be loaded."""


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
