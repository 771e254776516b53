"""Attention-free and reference baselines from `transformers` — Mamba, RWKV, GPT-NeoX (Pythia) — sized to match a
target parameter count (the backbone's), so the attention_free study compares architectures, not sizes.

Every baseline keeps the backbone's depth and vocabulary; only the width is searched (in steps of `multiple`) for
the total parameter count closest to the target. `build_baseline` checks the match is within `tolerance`.
"""
from __future__ import annotations

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, MambaConfig, MambaForCausalLM, RwkvConfig, RwkvForCausalLM

from effllm_utils import check_keys, config_args

FAMILIES = ("mamba", "rwkv", "pythia")


def _config(family: str, hidden: int, n_layers: int, vocab_size: int, context: int, overrides: dict | None = None):
    if family not in FAMILIES:
        raise ValueError(f"unknown baseline family {family!r}; choose one of {', '.join(FAMILIES)}")
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layers, tie_word_embeddings=False)
    if family == "mamba":
        # use_mambapy: without the mamba_ssm CUDA kernels, the parallel scan of `mambapy` (pure PyTorch) is ~9x
        # faster than transformers' sequential reference scan (1.9 vs 17 s/step measured on the tiny CPU profile);
        # on CPU both give way to effllm's selective scan (mamba_scan.py), installed by build_baseline
        kw = dict(state_size=16, expand=2, conv_kernel=4, use_cache=True, use_mambapy=True)
    elif family == "rwkv":
        kw = dict(attention_hidden_size=hidden, intermediate_size=4 * hidden, context_length=context)
    else:  # pythia
        heads = max(1, hidden // 64) if hidden >= 64 else 1
        while hidden % heads:
            heads -= 1
        kw = dict(num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=context,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                  use_parallel_residual=True)  # Pythia's: rotary on a quarter of each head, parallel residual
    return _CONFIGS[family](**(common | kw | (overrides or {})))


SEARCHED = ("vocab_size", "hidden_size", "num_hidden_layers")  # set by the match to the backbone, not overridable


def check_overrides(family: str, overrides: dict, where: str = "baseline") -> None:
    """Raise ValueError for an override a `family` config does not have (with the closest name), or one the
    parameter match sets. `transformers` configs take unknown keys silently, so a typo would train the default."""
    valid = sorted(set(_config(family, 64, 1, 64, 32).to_dict()) | set(config_args(_CONFIGS[family])))
    if fixed := [k for k in overrides if k in SEARCHED]:
        raise ValueError(f"{where}: {', '.join(fixed)} of the {family} baseline is set by matching the backbone's "
                         f"vocabulary, depth and parameter count; change the scale instead")
    check_keys(overrides, valid, where, f"{_CONFIGS[family].__name__} field")


_CLASSES = {"mamba": MambaForCausalLM, "rwkv": RwkvForCausalLM, "pythia": GPTNeoXForCausalLM}
_CONFIGS = {"mamba": MambaConfig, "rwkv": RwkvConfig, "pythia": GPTNeoXConfig}


# Sequence-mixing FLOPs per token and layer beyond the weight matmuls, counted as transformers' reference code runs
# them (exp and max count one each): Mamba's selective scan per state element (d_inner x d_state): dt*A, exp, dt*B,
# *x, the state update (mul + add) and the readout by C (mul + add) = 8; RWKV's WKV per channel: the output
# (k + u, max, two exps with their shifts, two mul-adds, a mul-add, a division: 13) and the state update (12) = 25;
# Pythia's attention as the backbone's (PaLM): QK^T and AV, 2 FLOPs per multiply-add, each query over the context.
SCAN_FLOPS_PER_STATE = 8
WKV_FLOPS_PER_CHANNEL = 25


def forward_flops_per_token(model, family: str, context: int) -> float:
    """Forward FLOPs per token of a baseline under the suite's one convention (metrics.METRICS["flops_per_token"]):
    2 x the linear and convolution weights a token passes through (embeddings excluded, the LM head included) plus
    the family's sequence mixing per layer (see SCAN_FLOPS_PER_STATE, WKV_FLOPS_PER_CHANNEL)."""
    c = model.config
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)))
    if family == "mamba":
        mix = SCAN_FLOPS_PER_STATE * c.intermediate_size * c.state_size
    elif family == "rwkv":
        mix = WKV_FLOPS_PER_CHANNEL * c.attention_hidden_size
    elif family == "pythia":
        mix = 2 * 2 * c.hidden_size * context  # heads x (qk + v head dims) = 2 x hidden
    else:
        raise ValueError(f"unknown baseline family {family!r}; choose one of {', '.join(FAMILIES)}")
    return float(2 * weights + c.num_hidden_layers * mix)


def count_params(family: str, hidden: int, n_layers: int, vocab_size: int, context: int,
                 overrides: dict | None = None) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        model = _CLASSES[family](_config(family, hidden, n_layers, vocab_size, context, overrides))
    return sum(p.numel() for p in model.parameters())


def match_width(family: str, target_params: int, n_layers: int, vocab_size: int, context: int,
                multiple: int = 8, overrides: dict | None = None) -> int:
    """The hidden size (a multiple of `multiple`) whose model is closest to `target_params`."""
    def count(hidden: int) -> int:
        return count_params(family, hidden, n_layers, vocab_size, context, overrides)

    lo, hi = multiple, multiple
    while count(hi) < target_params:
        lo, hi = hi, hi * 2
    while hi - lo > multiple:  # bisection on the (monotone) parameter count
        mid = (lo + hi) // 2 // multiple * multiple
        if count(mid) < target_params:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda h: abs(count(h) - target_params))


def build_baseline(family: str, target_params: int, n_layers: int, vocab_size: int, context: int,
                   tolerance: float = 0.10, multiple: int = 8, overrides: dict | None = None):
    """A freshly initialised `transformers` model of `family` within `tolerance` of `target_params`; `overrides`
    are fields of its config (`{"use_parallel_residual": False}` for Pythia), applied before the width search."""
    check_overrides(family, overrides or {})  # and the family
    if family == "mamba":
        from effllm_utils.models.mamba_scan import install

        install()  # the selective scan on CPU (see mamba_scan); CUDA keeps the library's path
    for step in sorted({multiple, 2, 1}, reverse=True):  # finer widths only when the coarse grid misses
        hidden = match_width(family, target_params, n_layers, vocab_size, context, step, overrides)
        n = count_params(family, hidden, n_layers, vocab_size, context, overrides)
        if abs(n - target_params) <= tolerance * target_params:
            return _CLASSES[family](_config(family, hidden, n_layers, vocab_size, context, overrides))
    raise ValueError(f"{family}: closest size has {n:,} parameters, more than {tolerance:.0%} from the target "
                     f"{target_params:,}; change n_layers")
