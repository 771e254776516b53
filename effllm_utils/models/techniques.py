"""Technique specs -> models: a technique is a dict of backbone config overrides, or a `baseline` (Mamba, RWKV,
Pythia) matched in parameters; `match_params: true` re-solves the width at fixed non-embedding parameters,
`match_params: ffn` the FFN width alone (iso-parameter variants of one part, e.g. attention). Every key is
checked against the config it sets (`check_specs`) before the first run trains.
"""
from __future__ import annotations

import math
from typing import Any

from effllm_utils.measure import metrics

SPECIAL_KEYS = ("baseline", "match_params")


# -- models ------------------------------------------------------------------------------------------------------

def _base_config(scale_dims: dict[str, Any], vocab_size: int, overrides: dict[str, Any]):
    from effllm_utils import models

    fields = {"vocab_size": vocab_size} | scale_dims | overrides
    models.config_fields_check(fields)
    return models.EffLLMConfig(**fields)


def scales(P: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A study's `scales` with named scales resolved (models.scale_dims): {scale: model dimensions}."""
    from effllm_utils import models

    return {name: models.scale_dims(value, f"scales[{name!r}]") for name, value in P["scales"].items()}


def check_specs(P: dict[str, Any]) -> None:
    """Every scale and technique of a study's params names real config fields and values, checked before the first
    run trains: a typo in the last technique would otherwise fail (or, unchecked, train the default) hours in."""
    from effllm_utils import models
    from effllm_utils.models.baselines import check_overrides

    for scale, dims in scales(P).items():
        models.config_fields_check(dims, f"scales[{scale!r}]")
        for technique, spec in P["techniques"].items():
            spec = dict(spec)
            where, matched = f"techniques[{technique!r}]", spec.pop("match_params", False)
            if matched not in (True, False, "ffn"):
                raise ValueError(f"{where}: match_params must be true (solve the width), ffn (solve the FFN width) "
                                 f"or false, not {matched!r}")
            if "baseline" in spec:
                if matched:
                    raise ValueError(f"{where}: match_params does not apply to a baseline (its width is always "
                                     f"matched to the backbone's parameter count); remove it")
                check_overrides(spec.pop("baseline"), spec, where)
                continue
            models.config_fields_check(spec, where)
            if "seq_len" in P:  # a language model's training context (the DiT's tokens are its patches)
                check_nsa_sparse(dims | spec, P["seq_len"], where)
            if matched is True:  # the width is solved per run; the spec's values are checked at that width
                continue
            try:
                _base_config(dims, P.get("vocab_size", 4096), spec)
            except ValueError as e:
                raise ValueError(f"{where} at scale {scale!r}: {e}") from None


def check_nsa_sparse(spec: dict[str, Any], context: int, where: str = "nsa") -> None:
    """Refuse an NSA config (a scale's dimensions with a technique's overrides) whose selected blocks and sliding
    window together cover the training context: there NSA
    is dense attention plus its compression and selection branches (more work than dense, not sparse attention),
    so a comparison with it would not be of sparse attention."""
    from effllm_utils import models

    if spec.get("attention") != "nsa":
        return
    d = models.EffLLMConfig()  # the defaults the spec leaves in place
    block = spec.get("nsa_block_size", d.nsa_block_size)
    sel, window = spec.get("nsa_num_selected", d.nsa_num_selected), spec.get("nsa_window", d.nsa_window)
    if sel * block + window >= context:
        raise ValueError(f"{where}: NSA's {sel} selected blocks x {block} tokens + a {window}-token window cover the "
                         f"{context}-token context, so it would be dense attention plus its branches, not sparse; "
                         f"set nsa_num_selected x nsa_block_size + nsa_window below {context} (or a longer seq_len)")


def non_embedding_params(cfg) -> int:
    """Parameters outside the token embedding and the LM head (Kaplan et al.'s N), counted without allocating."""
    import torch

    from effllm_utils.models import EffLLMForCausalLM

    with torch.device("meta"):
        model = EffLLMForCausalLM(cfg)
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def match_ffn(scale_dims: dict[str, Any], vocab_size: int, overrides: dict[str, Any], multiple: int = 8):
    """Overrides with intermediate_size solved (in steps of `multiple`) so the non-embedding parameter count is the
    closest to the scale's base config's: variants of one part (attention) then match in parameters, the dense FFN
    absorbing the difference, and width, depth and heads stay the base's."""
    target = non_embedding_params(_base_config(scale_dims, vocab_size, {}))
    ff0 = _base_config(scale_dims, vocab_size, overrides).intermediate_size

    def count(ff: int) -> int:
        return non_embedding_params(_base_config(scale_dims, vocab_size, overrides | {"intermediate_size": ff}))

    per_step = count(ff0 + multiple) - count(ff0)  # a dense FFN's parameters are linear in its width
    ff = ff0 + round((target - count(ff0)) / per_step) * multiple
    if ff < multiple:
        raise ValueError(f"match_params ffn: the variant holds {count(ff0) - target:,} more non-embedding parameters "
                         f"than the base, more than its FFN ({ff0} wide) can give up")
    return overrides | {"intermediate_size": int(ff)}


def match_hidden_size(scale_dims: dict[str, Any], vocab_size: int, overrides: dict[str, Any], multiple: int = 8):
    """Overrides with hidden_size (and intermediate_size in the scale's ratio) solved so the non-embedding parameter
    count is the closest to the scale's base config: depth changes, size does not. Non-embedding, because at small
    scales the embedding dominates the total and would hide the trade-off."""
    target = non_embedding_params(_base_config(scale_dims, vocab_size, {}))
    ratio = scale_dims.get("intermediate_size", 688) / scale_dims.get("hidden_size", 256)
    heads = overrides.get("num_attention_heads", scale_dims.get("num_attention_heads", 4))
    step = math.lcm(multiple, heads * 2)

    def with_width(h: int) -> dict[str, Any]:
        return overrides | {"hidden_size": h, "intermediate_size": int(round(h * ratio / 8)) * 8}

    return with_width(min(range(step, 64 * step + 1, step), key=lambda h: abs(
        non_embedding_params(_base_config(scale_dims, vocab_size, with_width(h))) - target)))


def _backbone_config(scale_dims: dict[str, Any], vocab_size: int, spec: dict[str, Any]):
    """The backbone config a non-baseline technique spec builds (match_params resolved)."""
    spec = dict(spec)
    how = spec.pop("match_params", False)
    if how == "ffn":
        spec = match_ffn(scale_dims, vocab_size, spec)
    elif how:
        spec = match_hidden_size(scale_dims, vocab_size, spec)
    return _base_config(scale_dims, vocab_size, spec)


def model_identity(scale_dims: dict[str, Any], vocab_size: int, spec: dict[str, Any]) -> dict[str, Any]:
    """What `build_model` builds, every default filled in: the backbone's full config, or a baseline family with its
    overrides and the dimensions it is matched to. Two specs with equal identities build the same model (the
    attention study's `gqa` and the positional-encoding study's `rope` are both the default backbone)."""
    if "baseline" in spec:
        return {"baseline": dict(spec), "dims": dict(scale_dims), "vocab_size": vocab_size}
    return _backbone_config(scale_dims, vocab_size, spec).to_dict()


def build_model(scale_dims: dict[str, Any], vocab_size: int, spec: dict[str, Any], context: int):
    """(model, flops_per_token or None, kv_bytes_per_token or None) for one technique spec."""
    from effllm_utils import models
    from effllm_utils.models import baselines
    from effllm_utils.models.baselines import build_baseline

    spec = dict(spec)
    family = spec.pop("baseline", None)
    if family is not None:
        backbone = models.EffLLMForCausalLM(_base_config(scale_dims, vocab_size, {}))
        n_layers = scale_dims.get("num_hidden_layers", backbone.config.num_hidden_layers)
        model = build_baseline(family, backbone.num_parameters(), n_layers, vocab_size, context, overrides=spec)
        return model, 3.0 * baselines.forward_flops_per_token(model, family, context), None
    cfg = _backbone_config(scale_dims, vocab_size, spec)
    model = models.EffLLMForCausalLM(cfg)
    shape = cfg.shape()
    return model, metrics.training_flops_per_token(shape, context), metrics.kv_bytes_per_token(shape, 2)
