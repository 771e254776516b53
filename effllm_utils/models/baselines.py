"""Attention-free and reference baselines from `transformers` — Mamba, RWKV, GPT-NeoX (Pythia) — sized to match a
target parameter count (the backbone's), so the attention_free study compares architectures, not sizes.

Every baseline keeps the backbone's depth and vocabulary; only the width is searched (in steps of `multiple`) for
the total parameter count closest to the target. `build_baseline` checks the match is within `tolerance`.
"""
from __future__ import annotations

import torch
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, MambaConfig, MambaForCausalLM, RwkvConfig,
                          RwkvForCausalLM)

FAMILIES = ("mamba", "rwkv", "pythia")


def _config(family: str, hidden: int, n_layers: int, vocab_size: int, context: int):
    if family == "mamba":
        # use_mambapy: without the mamba_ssm CUDA kernels, the parallel scan of `mambapy` (pure PyTorch) is ~9x
        # faster than transformers' sequential reference scan (1.9 vs 17 s/step measured on the tiny CPU profile);
        # on CPU both give way to effllm's selective scan (mamba_scan.py), installed by build_baseline
        return MambaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layers, state_size=16,
                           expand=2, conv_kernel=4, use_cache=True, tie_word_embeddings=False, use_mambapy=True)
    if family == "rwkv":
        return RwkvConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layers,
                          attention_hidden_size=hidden, intermediate_size=4 * hidden, context_length=context,
                          tie_word_embeddings=False)
    if family == "pythia":
        heads = max(1, hidden // 64) if hidden >= 64 else 1
        while hidden % heads:
            heads -= 1
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layers,
                             num_attention_heads=heads, intermediate_size=4 * hidden, rotary_pct=0.25,
                             max_position_embeddings=context, use_parallel_residual=True, tie_word_embeddings=False)
    raise ValueError(f"unknown baseline family {family!r}; choose one of {', '.join(FAMILIES)}")


_CLASSES = {"mamba": MambaForCausalLM, "rwkv": RwkvForCausalLM, "pythia": GPTNeoXForCausalLM}


def count_params(family: str, hidden: int, n_layers: int, vocab_size: int, context: int) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        model = _CLASSES[family](_config(family, hidden, n_layers, vocab_size, context))
    return sum(p.numel() for p in model.parameters())


def match_width(family: str, target_params: int, n_layers: int, vocab_size: int, context: int,
                multiple: int = 8) -> int:
    """The hidden size (a multiple of `multiple`) whose model is closest to `target_params`."""
    lo, hi = multiple, multiple
    while count_params(family, hi, n_layers, vocab_size, context) < target_params:
        lo, hi = hi, hi * 2
    while hi - lo > multiple:  # bisection on the (monotone) parameter count
        mid = (lo + hi) // 2 // multiple * multiple
        if count_params(family, mid, n_layers, vocab_size, context) < target_params:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda h: abs(count_params(family, h, n_layers, vocab_size, context) - target_params))


def build_baseline(family: str, target_params: int, n_layers: int, vocab_size: int, context: int,
                   tolerance: float = 0.10, multiple: int = 8):
    """A freshly initialised `transformers` model of `family` within `tolerance` of `target_params`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown baseline family {family!r}; choose one of {', '.join(FAMILIES)}")
    if family == "mamba":
        from .mamba_scan import install

        install()  # the selective scan on CPU (see mamba_scan); CUDA keeps the library's path
    for step in sorted({multiple, 2, 1}, reverse=True):  # finer widths only when the coarse grid misses
        hidden = match_width(family, target_params, n_layers, vocab_size, context, step)
        n = count_params(family, hidden, n_layers, vocab_size, context)
        if abs(n - target_params) <= tolerance * target_params:
            return _CLASSES[family](_config(family, hidden, n_layers, vocab_size, context))
    raise ValueError(f"{family}: closest size has {n:,} parameters, more than {tolerance:.0%} from the target "
                     f"{target_params:,}; change n_layers")
