"""The inference harness: prefill latency, per-token decode latency from per-token timestamps, end-to-end request
latency and throughput over a batch-size sweep, with telemetry, for several models measured side by side.

    results = measure({"fp32": m1, "int8": m2}, prompts, InferConfig(batch_sizes=[1, 4]), device="cpu")

Greedy decoding with the model's KV cache, one forward per token; the device is synchronised after every token and
its timestamp taken, so decode latencies are measured, not derived by subtraction. Warm-up requests (the full prompt,
`warmup_tokens` new tokens) are excluded;
each (technique, batch size) is repeated until both `min_time_s` of measured requests and `min_requests` are reached;
the order of techniques rotates every round, so drift (thermal, a noisy neighbour) does not favour one.
Latencies (prefill, per-token decode mean/p50/p90, request AL) are those of the smallest batch size in the sweep
(`latency_batch`, 1 by default: the latency regime), each batch size's in `latency_by_batch`; IT is the best
throughput over the sweep (`it_by_batch`). Pooling the batch sizes would mix two populations in one percentile.
Telemetry: a Monitor window around each request, accumulated per technique; `attribute_memory` gives each of several
resident models its own memory (see `measure`).

A model decodes eagerly through its own forward (any transformers model, quantized or not); on GPU launch overhead
dominates that for small models. Wrap it in `FastDecode` to decode through `effllm_utils.engine.decode.StaticDecoder`
instead (static KV cache; torch.compile + a CUDA graph per token on GPU; the backbone and Qwen2/Llama-family
checkpoints with plain float weights, or `from_gptq` / `from_int8` for their quantized integers):
`measure({"bf16": FastDecode(model, max_len=256)}, ...)`. Its per-token timestamps come from CUDA events after each
graph replay (the host clock on CPU).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from effllm_utils.core.runtime import synchronize
from effllm_utils.measure import metrics
from effllm_utils.measure.telemetry import Monitor, held_bytes, own_memory, trim_heap
from effllm_utils.models import CACHE_FIELD, output_cache


@dataclasses.dataclass
class InferConfig:
    prompt_len: int = 64
    new_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1, 4)
    min_time_s: float = 1.0  # measured request time per (technique, batch size), at least
    min_requests: int = 3  # and at least this many requests
    max_requests: int = 50
    warmup_requests: int = 1
    warmup_tokens: int = 4  # tokens each warm-up request generates: its prefill is a measured request's, and every
    # decode step after it has the same shapes (static cache) or one more cached position, so a few steps warm them
    telemetry_period_s: float = 0.1
    progress: bool = True  # a progress bar over the timed requests (updated between them)

    def __post_init__(self):
        self.batch_sizes = tuple(self.batch_sizes)
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be at least 2 to time decoding, got {self.new_tokens}")


class FastDecode:
    """A model decoded through `decode.StaticDecoder` (one decoder per batch size, built on first use).

    Raises ValueError (with the reason) for a model the static decoder cannot run: quantized weights (int8/int4
    modules or tensor subclasses), another architecture, or an attention/FFN type it does not implement."""

    def __init__(self, model, max_len: int, compile: bool | None = None, cuda_graph: bool = True,
                 weights: str = "native", int4_weights: dict | None = None, int8_weights: dict | None = None):
        from effllm_utils.engine import decode
        from effllm_utils.models import EffLLMForCausalLM

        odd = {type(p).__name__ if type(p) is not torch.nn.Parameter else str(p.dtype)
               for p in model.parameters() if type(p) is not torch.nn.Parameter or not p.is_floating_point()}
        odd |= {type(m).__name__ for n, m in model.named_modules()
                if n.endswith(("_proj", "lm_head")) and type(m) is not torch.nn.Linear}
        if odd:
            raise ValueError(f"quantized weights ({', '.join(sorted(odd))}): the static decoder runs plain float "
                             f"weights")
        if not isinstance(model, EffLLMForCausalLM):
            model = decode.from_hf(model)  # Qwen2 / Llama families; refuses others with the reason
        self.model, self.max_len = model, max_len
        # refuses, with the reason, what it cannot run
        self.prepared = decode.DecodeWeights(model, weights, int4_weights=int4_weights, int8_weights=int8_weights)
        self.device = next(model.parameters()).device
        self.compile = self.device.type == "cuda" if compile is None else compile
        self.cuda_graph = cuda_graph
        self.decoders: dict[int, Any] = {}  # one per batch size, all reading self.prepared
        self.path = "static" + ("+compile" if self.compile else "") + (
            "+graph" if cuda_graph and self.device.type == "cuda" else "") + (
            f"+int4({self.prepared.int4_kernel})" if self.prepared.int4 else "") + (
            "+int8(int8pack)" if self.prepared.int8 else "") + (
            "+triton_gemv" if self.prepared.dense_kernel == "triton" else "")

    @classmethod
    def from_gptq(cls, path, max_len: int, device: str, **kw) -> "FastDecode":
        """A 4-bit GPTQ checkpoint (GPTQModel's format, incl. its RTN) decoded with its own int4 weights through
        tinygemm (`decode.from_gptq`: read from the safetensors, no GPTQ kernels needed)."""
        from effllm_utils.engine.decode import from_gptq

        model, q4 = from_gptq(path, device)
        return cls(model, max_len, int4_weights=q4, **kw)._release()

    @classmethod
    def from_int8(cls, model, max_len: int, device: str, **kw) -> "FastDecode":
        """A torchao int8 weight-only model decoded with its own int8 weights through torch's `_weight_int8pack_mm`
        (CPU; bf16 activations, measured 2.8x fp32's F.linear per matrix-vector product here)."""
        from effllm_utils.engine.decode import from_int8

        backbone, q8 = from_int8(model, device)
        return cls(backbone, max_len, int8_weights=q8, **kw)._release()

    def _release(self) -> "FastDecode":
        """Drop the float projection weights of this decoder's own backbone (its integers are in `prepared`):
        what it holds is then what an int8/int4 deployment holds."""
        from effllm_utils.engine.decode import release_projections

        release_projections(self.model)
        return self

    def request(self, ids: torch.Tensor, new_tokens: int) -> dict[str, Any]:
        from effllm_utils.engine.decode import StaticDecoder

        B = ids.shape[0]
        if B not in self.decoders:
            self.decoders[B] = StaticDecoder(self.model, B, self.max_len, cuda_graph=self.cuda_graph,
                                             compile=self.compile, prepared=self.prepared)
        synchronize(str(self.device))
        t0 = time.perf_counter()
        _, stamps = self.decoders[B].generate(ids, new_tokens)
        return {"prefill_s": stamps[0] - t0, "token_s": list(np.diff(stamps)), "e2e_s": stamps[-1] - t0,
                "tokens": B * new_tokens}


@torch.no_grad()
def timed_request(model, ids: torch.Tensor, new_tokens: int, device: str) -> dict[str, Any]:
    """One greedy request: prefill, then `new_tokens - 1` decode steps, a timestamp after each (synchronised).
    A `FastDecode` model runs its static decoder instead."""
    if isinstance(model, FastDecode):
        return model.request(ids, new_tokens)
    synchronize(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    synchronize(device)
    stamps = [time.perf_counter()]
    cache = output_cache(out)
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, use_cache=True, **{CACHE_FIELD: cache})
        cache = output_cache(out)
        nxt = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        stamps.append(time.perf_counter())
    return {"prefill_s": stamps[0] - t0, "token_s": list(np.diff(stamps)), "e2e_s": stamps[-1] - t0,
            "tokens": ids.shape[0] * new_tokens}


def measure(models: dict[str, Any], prompts: torch.Tensor, cfg: InferConfig, device: str,
            attribute_memory: bool = False) -> dict[str, dict]:
    """Side-by-side measurement of every model on the same prompts ([N, >= prompt_len] token ids).

    Every model is resident while each is measured, so the device's (or process's) memory in use is the same for all
    of them. With `attribute_memory`, a model's AMU and peak are its own: the bytes it holds (`telemetry.held_bytes`,
    taken after the measurement, so a static decoder's KV cache is in) plus what its requests add above each window's
    start (`amu_growth_gb`, `peak_growth_gb`: torch's allocated bytes on CUDA; RSS on CPU, with the C heap trimmed
    before each window so reused free pages do not hide the growth). Without it they are the telemetry's totals
    (`amu_method` "telemetry_total"), which do not tell resident models apart."""
    if prompts.shape[1] < cfg.prompt_len or prompts.shape[0] < max(cfg.batch_sizes):
        raise ValueError(f"prompts must be at least [{max(cfg.batch_sizes)}, {cfg.prompt_len}], "
                         f"got {tuple(prompts.shape)}")
    from effllm_utils.core import progress

    names = list(models)
    bar = progress.bar(desc=f"decode {', '.join(names)}", unit="request", disable=not cfg.progress, mininterval=1.0)
    acc = {n: {"prefill": {}, "token": {}, "e2e": {}, "it": {}, "wall": 0.0, "energy": 0.0, "energy_ok": True,
               "amu_x_wall": 0.0, "peak": 0.0, "growth_x_wall": 0.0, "peak_growth": 0.0, "rss_x_wall": 0.0,
               "tokens": 0, "reason": None} for n in names}
    cpu = not device.startswith("cuda")
    for b in cfg.batch_sizes:
        ids = prompts[:b, :cfg.prompt_len].to(device)
        for n in names:  # warm-up, not measured
            for _ in range(cfg.warmup_requests):
                timed_request(models[n], ids, min(cfg.new_tokens, max(2, cfg.warmup_tokens)), device)
        done = {n: {"time": 0.0, "count": 0, "tokens": 0} for n in names}
        rnd = 0
        while any(d["count"] < cfg.min_requests or d["time"] < cfg.min_time_s for d in done.values()) \
                and rnd < cfg.max_requests:
            order = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate so drift hits all alike
            for n in order:
                if cpu and attribute_memory:
                    trim_heap()
                with Monitor(period_s=cfg.telemetry_period_s, device=device) as mon:
                    r = timed_request(models[n], ids, cfg.new_tokens, device)
                _accumulate(acc[n], b, r, mon.summary)
                bar.update(1)  # after the request's window closed
                bar.set_postfix_str(f"batch {b}, round {rnd + 1}, {n}", refresh=False)
                done[n]["time"] += r["e2e_s"]
                done[n]["count"] += 1
                done[n]["tokens"] += r["tokens"]
            rnd += 1
        for n in names:
            acc[n]["it"][b] = done[n]["tokens"] / done[n]["time"]
    bar.close()
    return {n: _summary(a, models[n], cfg, attribute_memory) for n, a in acc.items()}


def _accumulate(a: dict, b: int, r: dict, s: dict) -> None:
    """Add one timed request `r` at batch size `b`, with its telemetry summary `s`, to a model's accumulator."""
    a["prefill"].setdefault(b, []).append(r["prefill_s"])
    a["token"].setdefault(b, []).extend(r["token_s"])
    a["e2e"].setdefault(b, []).append(r["e2e_s"])
    a["wall"] += s["wall_s"]
    a["amu_x_wall"] += (s["amu_gb"] or 0.0) * s["wall_s"]
    a["peak"] = max(a["peak"], s["peak_mem_gb"] or 0.0)
    a["growth_x_wall"] += (s["amu_growth_gb"] or 0.0) * s["wall_s"]
    a["peak_growth"] = max(a["peak_growth"], s["peak_growth_gb"] or 0.0)
    a["rss_x_wall"] += (s["rss_amu_gb"] or 0.0) * s["wall_s"]
    a["tokens"] += r["tokens"]
    if s["energy_j"] is None:
        a["energy_ok"], a["reason"] = False, s["energy_reason"]
    else:
        a["energy"] += s["energy_j"]


def _summary(a: dict, model, cfg: InferConfig, attribute_memory: bool) -> dict[str, Any]:
    """One model's metrics from its accumulator: latencies per batch size, IT, memory (its own with
    `attribute_memory`), energy."""
    by_batch = {str(b): _latencies(a["prefill"][b], a["token"][b], a["e2e"][b]) for b in cfg.batch_sizes}
    mem = {"amu_gb": a["amu_x_wall"] / a["wall"], "peak_mem_gb": a["peak"], "amu_method": "telemetry_total"}
    if attribute_memory:
        mem = own_memory(held_bytes(model), a["growth_x_wall"] / a["wall"], a["peak_growth"],
                         "held_bytes_plus_request_growth")
    return {**by_batch[str(min(cfg.batch_sizes))], "latency_batch": min(cfg.batch_sizes),
            "latency_by_batch": by_batch,
            "it": max(a["it"].values()), "it_by_batch": {str(b): v for b, v in a["it"].items()},
            **mem, "amu_growth_gb": a["growth_x_wall"] / a["wall"], "peak_growth_gb": a["peak_growth"],
            "rss_amu_gb": a["rss_x_wall"] / a["wall"],
            "energy_j": a["energy"] if a["energy_ok"] else None,
            "aec_w": a["energy"] / a["wall"] if a["energy_ok"] else None,
            "j_per_token": a["energy"] / a["tokens"] if a["energy_ok"] else None,
            "requests": sum(len(v) for v in a["e2e"].values()), "energy_reason": a["reason"]}



def _latencies(prefill: list[float], token: list[float], e2e: list[float]) -> dict[str, float]:
    tok, req = metrics.latency(token), metrics.latency(e2e)
    return {"prefill_s": float(np.mean(prefill)), "decode_token_s": tok["al_s"], "decode_token_p50_s": tok["al_p50_s"],
            "decode_token_p90_s": tok["al_p90_s"], "al_s": req["al_s"], "al_p50_s": req["al_p50_s"],
            "al_p90_s": req["al_p90_s"], "requests": len(e2e)}


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, max_windows: int, device: str,
               tokens_per_forward: int = 2048) -> float:
    """exp(mean over windows of each window's mean token cross-entropy) over up to `max_windows` evenly spaced,
    non-overlapping windows of `ids`, several windows per forward (about `tokens_per_forward` tokens)."""
    n = min(max_windows, (len(ids) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"need more than {seq_len} tokens for perplexity, got {len(ids)}")
    starts = torch.linspace(0, len(ids) - seq_len - 1, n).long().tolist()
    windows = torch.stack([ids[s:s + seq_len] for s in starts])
    losses = []
    for x in windows.split(max(1, tokens_per_forward // seq_len)):
        x = x.to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        losses.extend(nll.view(len(x), -1).mean(1).tolist())
    return float(np.exp(np.mean(losses)))
