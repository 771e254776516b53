"""The paper's efficiency metrics as one table of definitions, their formulas, analytic FLOP counters and a
device-peak table with a source per entry.

Every metric key carries its unit (`amu_gb`, `al_s`, `aec_w`); `METRICS` is the single place that says what a key
means, its unit, which direction is better and which equation of the paper (Yuan et al. 2025, arXiv 2505.13840,
Sec. 5.1) it implements. Where the paper's printed formula and its tables disagree we follow the tables and say so
(see `../shared/reference/efficientllm_paper_values/README.md`).

Long by design: the definitions (each with its unit, direction, paper equation and table name), the formulas and the
per-family FLOP counters are one reference a reader checks against the paper side by side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

GB = 1e9  # metrics use decimal gigabytes, as NVML's and the paper's tables do

# ----------------------------------------------------------------------------------------------------------------
# The definitions table
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    unit: str
    better: str | None  # "lower", "higher" or None (descriptive only)
    paper: str  # where the paper defines it ("Eq. 1"), or "—" for our additions
    description: str
    name: str = ""  # the short name in tables and on axes ("AMU"); the key when empty


def header(key: str, per: str | None = None) -> str:
    """The table header / axis label of a metric key: its name and unit from `METRICS` ("AMU (GB)"; a unit-less
    metric is its name alone; `per` qualifies the unit: header("al_s", per="iter") is "AL (s/iter)"). A derived
    column `<metric>_se` / `_before` / `_real_vs_real` gets the metric's header and that qualifier; any other key
    is returned with its underscores as spaces."""
    for suffix, words in DERIVED.items():
        if key.endswith(suffix) and key[: -len(suffix)] in METRICS:
            return f"{header(key[: -len(suffix)], per)} {words}"
    m = METRICS.get(key)
    if m is None:
        return key.replace("_", " ")
    unit = m.unit + (f"/{per}" if per else "")
    return m.name or key if m.unit == "1" else f"{m.name or key} ({unit})"


DERIVED = {"_se": "s.e.", "_before": "before", "_real_vs_real": "real vs real"}


METRICS: dict[str, Metric] = {m.key: m for m in [
    Metric("amu_gb", "GB", "lower", "Eq. 1",
           "Average memory utilisation: time-averaged memory in use per device (NVML device memory on GPU; on CPU "
           "the run's own: the bytes its model and optimizer state, or its decoder, hold plus what the timed work "
           "adds above the window's start — not the process's RSS, mostly Python and libraries). The paper's tables "
           "report GB, its Eq. 1 a fraction; both are kept.", name="AMU"),
    Metric("amu_frac", "1", "lower", "Eq. 1", "amu_gb divided by the device's memory capacity.", name="AMU fraction"),
    Metric("peak_mem_gb", "GB", "lower", "—",
           "Peak torch.cuda allocated memory on GPU; on CPU the held bytes plus the peak sampled growth, as amu_gb.",
           name="peak mem"),
    Metric("rss_amu_gb", "GB", "lower", "—",
           "Time-averaged RSS of the whole process (Python, libraries and every resident model): what the OS sees.",
           name="RSS AMU"),
    Metric("pcu", "1", "higher", "Eq. 2",
           "Compute utilisation: achieved FLOP/s divided by the device's peak FLOP/s (MFU-style). The paper's Eq. 2 "
           "is a time average of NVML busy time; that is kept beside it as gpu_util_pct.", name="PCU"),
    Metric("mfu_pct", "%", "higher", "—",
           "Model FLOPs utilisation: analytic model FLOPs per second / peak FLOP/s, in percent (PaLM, App. B).",
           name="MFU"),
    Metric("gpu_util_pct", "%", "higher", "Eq. 2", "Time-averaged NVML utilization.gpu (fraction of time busy).",
           name="GPU util"),
    Metric("al_s", "s", "lower", "Eq. 3",
           "Average latency: mean seconds per training iteration or per inference request (p50/p90 beside it).",
           name="AL"),
    Metric("al_p50_s", "s", "lower", "—", "Median latency.", name="AL p50"),
    Metric("al_p90_s", "s", "lower", "—", "90th-percentile latency.", name="AL p90"),
    Metric("tt", "tokens/param/s", "higher", "Eq. 4", "Token throughput per parameter (pretraining).", name="TT"),
    Metric("st", "samples/param/s", "higher", "Eq. 5", "Sample throughput per parameter (fine-tuning).", name="ST"),
    Metric("it", "tokens/s", "higher", "Eq. 6", "Inference throughput: generated tokens per second.", name="IT"),
    Metric("tokens_per_s", "tokens/s", "higher", "—", "Plain token throughput.", name="throughput"),
    Metric("aec_w", "W", "lower", "Eqs. 7-8",
           "Average energy consumption: energy / time, i.e. average power per device (the paper's unit is W).",
           name="AEC"),
    Metric("energy_j", "J", "lower", "Eq. 7", "Energy over the measured window.", name="energy"),
    Metric("j_per_token", "J/token", "lower", "—", "Energy per processed or generated token.", name="energy per token"),
    Metric("mcr", "1", "higher", "Eq. 9",
           "Model compression rate, paper definition: nominal size ratio (bit widths) x performance retention.",
           name="MCR"),
    Metric("mcr_measured", "1", "higher", "—", "Like mcr but with measured bytes instead of nominal bit widths.",
           name="MCR (measured bytes)"),
    Metric("efficiency_score", "1", "higher", "Eqs. 10-12",
           "Direction-correct composite over AMU, PCU, AL, throughput and AEC (see efficiency_score()).",
           name="efficiency score"),
    Metric("ppl", "1", "lower", "—", "Perplexity, exp(mean token cross-entropy in nats).", name="PPL"),
    Metric("loss", "nats/token", "lower", "—", "Mean token cross-entropy.", name="loss"),
    Metric("score", "1", "higher", "—", "Task score (accuracy-like, 0-1).", name="score"),
    Metric("fid", "1", "lower", "—", "Frechet distance between feature distributions (the feature net is named).",
           name="FID"),
    Metric("kv_bytes_per_token", "B/token", "lower", "—", "KV-cache bytes stored per token (all layers).",
           name="KV cache"),
    Metric("flops_per_token", "FLOP/token", None, "—",
           "Analytic FLOPs per token a run counts for PCU/MFU (training runs: forward + backward = 3 x forward). One "
           "convention for every model family: 2 x the matmul weights a token passes through (linear and "
           "convolution weights; embeddings excluded, the LM head included; MoE: the active experts) plus the "
           "family's sequence mixing per layer: attention 2 x heads x (qk + v head dims) x context (PaLM; NSA: its "
           "selected context), Mamba's selective scan 8 x d_inner x d_state, RWKV's WKV recurrence 25 x channels; "
           "elementwise work (norms, activations, gates) is not counted in any family "
           "(metrics.forward_flops_per_token, baselines.forward_flops_per_token).", name="FLOPs"),
    Metric("params", "1", None, "—", "Parameter count.", name="params"),
    Metric("tokens_seen", "tokens", None, "—",
           "The training budget: tokens the run trained on (steps x batch x accumulation x sequence length).",
           name="tokens seen"),
    Metric("tokens_per_param", "1", None, "—",
           "tokens_seen / params: the budget relative to the model (compute-optimal is ~20, Hoffmann et al. 2022).",
           name="tokens/param"),
    Metric("trainable_params", "1", None, "—", "Parameters the optimizer updates.", name="trainable params"),
    Metric("train_loss", "nats/token", "lower", "—", "Mean training loss over the last 5 steps.", name="train loss"),
    Metric("prefill_s", "s", "lower", "—", "Seconds to process the prompt of one request.", name="prefill"),
    Metric("decode_token_p50_s", "s/token", "lower", "—", "Median seconds per generated token after the prefill.",
           name="decode p50"),
    Metric("decode_token_p90_s", "s/token", "lower", "—", "90th-percentile seconds per generated token.",
           name="decode p90"),
    Metric("memory_bytes", "B", "lower", "—", "Bytes the weights occupy in memory.", name="bytes in memory"),
    Metric("disk_bytes", "B", "lower", "—", "Bytes the saved model occupies on disk.", name="bytes on disk"),
    Metric("digit_acc", "1", "higher", "—", "Accuracy on the vision-language digit task.", name="digit acc"),
    Metric("frozen_head_floor", "nats/token", None, "—",
           "Lowest eval loss reachable with the output head frozen (a fine-tuning ceiling).", name="frozen-head floor"),
    # hardware calibration (the `hardware` study)
    Metric("matmul_tflops", "TFLOP/s", "higher", "—",
           "Measured dense matmul throughput (2 n^3 FLOPs per n x n GEMM).", name="matmul"),
    Metric("mem_bw_gbs", "GB/s", "higher", "—", "Measured device memory copy bandwidth (bytes read + written).",
           name="memory bandwidth"),
    Metric("idle_power_w", "W", "lower", "—", "Average power of the idle device over a window.", name="idle power"),
    Metric("telemetry_overhead_pct", "%", "lower", "—", "Step-time increase with the Monitor sampling vs without.",
           name="telemetry overhead"),
]}


def better(key: str) -> str | None:
    """'lower' or 'higher' for a metric key (unknown keys are a ValueError naming the key)."""
    try:
        return METRICS[key].better
    except KeyError:
        raise ValueError(f"unknown metric {key!r}; known metrics: {', '.join(METRICS)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Formulas
# ----------------------------------------------------------------------------------------------------------------


def time_average(values: Sequence[float], times: Sequence[float]) -> float:
    """Time-weighted mean of a sampled signal (trapezoid rule), i.e. (1/T) * integral of v(t) dt.

    One sample gives that sample; samples need not be evenly spaced (a sampler thread never is)."""
    v = np.asarray(values, dtype=float)
    t = np.asarray(times, dtype=float)
    if v.shape != t.shape or v.size == 0:
        raise ValueError(f"time_average needs equally long, non-empty values and times (got {v.size} and {t.size})")
    if v.size == 1 or t[-1] == t[0]:
        return float(v.mean())
    return float(np.trapezoid(v, t) / (t[-1] - t[0]))


def integrate(values: Sequence[float], times: Sequence[float]) -> float:
    """Integral of a sampled signal over its window (trapezoid rule): power samples in W give energy in J."""
    v = np.asarray(values, dtype=float)
    t = np.asarray(times, dtype=float)
    if v.shape != t.shape or v.size < 2:
        raise ValueError(f"integrate needs at least two samples with times (got {v.size})")
    return float(np.trapezoid(v, t))


def amu(mem_used_bytes: Sequence[float], times: Sequence[float], capacity_bytes: float) -> dict[str, float]:
    """Eq. 1: time-averaged memory in use, in GB and as a fraction of capacity."""
    avg = time_average(mem_used_bytes, times)
    return {"amu_gb": avg / GB, "amu_frac": avg / capacity_bytes}


def pcu(achieved_flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Achieved FLOP/s over the device's peak FLOP/s (a fraction)."""
    if seconds <= 0 or peak_flops_per_s <= 0:
        raise ValueError(f"pcu needs positive seconds and peak (got {seconds}, {peak_flops_per_s})")
    return achieved_flops / seconds / peak_flops_per_s


def mfu_pct(model_flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation in percent: analytic model FLOPs (no recomputation) per second over peak."""
    return 100.0 * pcu(model_flops, seconds, peak_flops_per_s)


def latency(durations_s: Iterable[float]) -> dict[str, float]:
    """Eq. 3: mean latency per iteration/request, with the median and 90th percentile."""
    d = np.asarray(list(durations_s), dtype=float)
    if d.size == 0:
        raise ValueError("latency needs at least one duration")
    return {"al_s": float(d.mean()), "al_p50_s": float(np.percentile(d, 50)), "al_p90_s": float(np.percentile(d, 90))}


def tt(tokens: float, params: float, seconds: float) -> float:
    """Eq. 4: tokens per second per parameter (pretraining)."""
    return tokens / params / seconds


def st(samples: float, params: float, seconds: float) -> float:
    """Eq. 5: samples per second per parameter (fine-tuning)."""
    return samples / params / seconds


def it(generated_tokens: float, seconds: float) -> float:
    """Eq. 6: generated tokens per second (inference)."""
    return generated_tokens / seconds


def aec(energy_j: float, seconds: float) -> float:
    """Eqs. 7-8: average power in W (energy over time), the paper's 'average energy consumption'."""
    return energy_j / seconds


def j_per_token(energy_j: float, tokens: float) -> float:
    return energy_j / tokens


def mcr(perf_compressed: float, perf_original: float, bits_original: float = 16, bits_compressed: float = 4) -> float:
    """Eq. 9 as the paper's tables use it: nominal size ratio (bit widths) x performance retention.

    Every MCR quoted in the paper equals 4 x perf_int4/perf_bf16 (and perf_fp16/perf_bf16 for fp16)."""
    return (bits_original / bits_compressed) * (perf_compressed / perf_original)


def mcr_measured(bytes_original: float, bytes_compressed: float, perf_compressed: float, perf_original: float) -> float:
    """Eq. 9 with measured model bytes instead of nominal bit widths."""
    return (bytes_original / bytes_compressed) * (perf_compressed / perf_original)


def normalize(values: Sequence[float], better: str) -> np.ndarray:
    """Eqs. 10-11: min-max normalise into [0.1, 1] so that 1 is best.

    lower-is-better: 0.1 + 0.9 (max - x)/(max - min); higher-is-better: 0.1 + 0.9 (x - min)/(max - min).
    When every value is equal there is nothing to separate and all get 1.0. NaN stays NaN."""
    x = np.asarray(values, dtype=float)
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', not {better!r}")
    lo, hi = np.nanmin(x), np.nanmax(x)
    if hi == lo:
        return np.where(np.isnan(x), np.nan, 1.0)
    frac = (hi - x) / (hi - lo) if better == "lower" else (x - lo) / (hi - lo)
    return 0.1 + 0.9 * frac


SCORE_METRICS = ("amu_gb", "pcu", "al_s", "st", "aec_w")


def efficiency_score(rows: Mapping[str, Sequence[float]] | "pandas.DataFrame",  # noqa: F821
                     metrics: Sequence[str] = SCORE_METRICS) -> np.ndarray:
    """The composite efficiency score, direction-correct form of the paper's Eq. 12.

    score = (1/k) * sum over the k metrics of ratio-to-best, where the ratio is min(x)/x for a lower-is-better
    metric and x/max(x) for a higher-is-better one, min/max over the rows compared. Each term lies in (0, 1] and
    1 is best. The paper prints 0.2*AL/min(AL) and 0.2*min(ST)/ST, which would reward slow methods; its Figure 4a
    bars are reproduced within 0.017 by this direction-correct form (shared reference README), so we use it.
    A metric missing for every row is dropped from the average (and the weights rescale)."""
    terms = []
    for key in metrics:
        x = np.asarray(rows[key], dtype=float)
        if np.all(np.isnan(x)):
            continue
        if np.nanmin(x) <= 0:
            raise ValueError(f"efficiency_score needs positive values of {key!r} (got min {np.nanmin(x)})")
        terms.append(np.nanmin(x) / x if better(key) == "lower" else x / np.nanmax(x))
    if not terms:
        raise ValueError(f"efficiency_score: none of {list(metrics)} has a value")
    return np.mean(terms, axis=0)


# ----------------------------------------------------------------------------------------------------------------
# Analytic FLOP counting (torch's FlopCounterMode misses SDPA on CPU and fails on GQA SDPA on CUDA)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerShape:
    """The shape of a decoder-only transformer, enough to count its FLOPs and KV bytes.

    attention: mha | gqa | mqa | mla | nsa. For mla the low-rank fields apply (DeepSeek-V2/V3 naming).
    For nsa, the keys one query attends to are seq_len/nsa_block compressed blocks + (nsa_selected + 2) selected
    blocks (the top ones, the first and the current) + the nsa_window sliding window, capped at seq_len — what a
    sparse kernel computes (effllm's reference NSA computes dense masked attention, so its MFU is understated).
    `attended_tokens`, when set, overrides that count for any attention.
    MoE: n_experts > 1 routes each token to top_k experts of width moe_d_ff (default d_ff), plus
    n_shared_experts always-on experts."""
    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int
    d_ff: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    attention: str = "mha"
    n_experts: int = 1
    top_k: int = 1
    moe_d_ff: int | None = None
    n_shared_experts: int = 0
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    nsa_block: int = 64
    nsa_selected: int = 16
    nsa_window: int = 512
    attended_tokens: float | None = None
    lm_head: bool = True

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        if self.attention == "mqa":
            return 1
        if self.attention == "mha":
            return self.n_heads
        return self.n_kv_heads or self.n_heads


def attention_matmul_params(s: TransformerShape) -> int:
    """Weights of the attention projections of one layer (each used once per token)."""
    if s.attention == "mla":
        qk = s.qk_nope_head_dim + s.qk_rope_head_dim
        q = (s.d_model * s.q_lora_rank + s.q_lora_rank * s.n_heads * qk) if s.q_lora_rank \
            else s.d_model * s.n_heads * qk
        kv = s.d_model * (s.kv_lora_rank + s.qk_rope_head_dim) \
            + s.kv_lora_rank * s.n_heads * (s.qk_nope_head_dim + s.v_head_dim)
        return q + kv + s.n_heads * s.v_head_dim * s.d_model
    hd = s.hd
    qkvo = s.d_model * s.n_heads * hd * 2 + s.d_model * s.kv_heads * hd * 2  # q, o ; k, v
    if s.attention == "nsa":  # + the branch gate (d -> 3 x heads) and the K/V block compressions: a (block x hd)
        # -> hd map per block and KV head is hd^2 multiply-adds per token and KV head, for K and for V
        return qkvo + 3 * s.n_heads * s.d_model + 2 * s.kv_heads * hd * hd
    return qkvo


def ffn_matmul_params_active(s: TransformerShape) -> int:
    """Feed-forward weights one token passes through in one layer (SwiGLU: 3 matrices), plus the router."""
    if s.n_experts <= 1:
        return 3 * s.d_model * s.d_ff
    width = s.moe_d_ff or s.d_ff
    return 3 * s.d_model * width * (s.top_k + s.n_shared_experts) + s.d_model * s.n_experts


def forward_flops_per_token(s: TransformerShape, seq_len: int) -> float:
    """Forward FLOPs per token: 2 x active matmul weights + the attention score/value products.

    Attention follows PaLM (Chowdhery et al. 2022, App. B): each query attends to seq_len keys (the causal mask is
    not halved, which is the convention MFU numbers are quoted in), 2 FLOPs per multiply-add for QK^T and for AV.
    Embedding lookups are free; the LM head counts when `lm_head`."""
    per_layer = attention_matmul_params(s) + ffn_matmul_params_active(s)
    matmul = 2 * (s.n_layers * per_layer + (s.d_model * s.vocab_size if s.lm_head else 0))
    if s.attention == "mla":
        qk, v = s.qk_nope_head_dim + s.qk_rope_head_dim, s.v_head_dim
    else:
        qk = v = s.hd
    ctx = seq_len
    if s.attended_tokens is not None:
        ctx = min(s.attended_tokens, seq_len)
    elif s.attention == "nsa":  # three branches, each over its own keys: compressed blocks, selected blocks (+ the
        # first and the current), the window; a context they cover costs more than dense attention
        ctx = (min(seq_len, seq_len / s.nsa_block) + min(seq_len, (s.nsa_selected + 2) * s.nsa_block)
               + min(seq_len, s.nsa_window))
    attn = 2 * s.n_layers * s.n_heads * (qk + v) * ctx
    return float(matmul + attn)


def training_flops_per_token(s: TransformerShape, seq_len: int) -> float:
    """Forward + backward (backward = 2 x forward) per token."""
    return 3.0 * forward_flops_per_token(s, seq_len)


def kv_bytes_per_token(s: TransformerShape, bytes_per_element: int = 2) -> int:
    """KV-cache bytes one token adds across all layers. MLA caches the compressed latent plus the shared RoPE key."""
    if s.attention == "mla":
        return s.n_layers * (s.kv_lora_rank + s.qk_rope_head_dim) * bytes_per_element
    return s.n_layers * 2 * s.kv_heads * s.hd * bytes_per_element


# ----------------------------------------------------------------------------------------------------------------
# Device peaks
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePeak:
    name: str
    match: tuple[str, ...]  # case-insensitive substrings of torch/NVML device names, all must occur
    tflops: dict[str, float]  # dense (no sparsity) peak per dtype
    mem_bw_tbs: float
    memory_gb: float
    source: str


_H100_SXM = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet (H100 SXM column; " \
            "dense = half the 'with sparsity' figure)"
# Most specific entries first: lookup takes the first whose substrings all occur in the device name.
DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("GH200 (144 GB HBM3e)", ("gh200", "144"),
               {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}, 4.9, 144,
               "https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/ (H100 tensor core in GH200)"),
    DevicePeak("GH200 (96 GB HBM3)", ("gh200",),
               {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}, 4.0, 96,
               "https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/ (H100 tensor core in GH200)"),
    DevicePeak("H200 NVL", ("h200", "nvl"),
               {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5}, 4.8, 141,
               "https://www.nvidia.com/en-us/data-center/h200/ (H200 NVL column; dense = half the sparsity figure)"),
    DevicePeak("H200 SXM", ("h200",),
               {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}, 4.8, 141,
               "https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM column; dense = half the sparsity figure)"),
    DevicePeak("H100 NVL", ("h100", "nvl"),
               {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5}, 3.9, 94,
               "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet (H100 NVL column)"),
    DevicePeak("H100 PCIe", ("h100", "pcie"),
               {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0}, 2.0, 80,
               "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet (H100 PCIe column)"),
    DevicePeak("H100 SXM", ("h100",),
               {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}, 3.35, 80, _H100_SXM),
    DevicePeak("A100 40GB", ("a100", "40gb"),
               {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, 1.555, 40,
               "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
               "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (A100 40GB)"),
    DevicePeak("A100 80GB PCIe", ("a100", "pcie"),
               {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, 1.935, 80,
               "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
               "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (A100 80GB PCIe)"),
    DevicePeak("A100 80GB SXM", ("a100",),
               {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, 2.039, 80,
               "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
               "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (A100 80GB SXM)"),
    DevicePeak("L40S", ("l40s",),
               {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05, "fp8": 733.0}, 0.864, 48,
               "https://www.nvidia.com/en-us/data-center/l40s/ (dense = half the sparsity figure)"),
    DevicePeak("L4", ("nvidia l4",),
               {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.5}, 0.3, 24,
               "https://www.nvidia.com/en-us/data-center/l4/ (dense = half the sparsity figure)"),
)


def lookup_device_peak(device_name: str) -> DevicePeak | None:
    """The table entry for a torch/NVML device name ('NVIDIA H100 80GB HBM3'), or None for unknown devices."""
    name = device_name.lower()
    for entry in DEVICE_PEAKS:
        if all(m in name for m in entry.match):
            return entry
    return None


def peak_flops(device_name: str, dtype: str, measured: Mapping[str, float] | None = None) -> tuple[float, str]:
    """(peak FLOP/s, source) for a device and dtype ('fp32', 'bf16', ...).

    The datasheet table wins; for unknown devices (every CPU) `measured` — the hardware study's measured matmul peak
    in TFLOP/s per dtype, see `effllm_utils.hardware.measured_peaks` — is used and named as such."""
    entry = lookup_device_peak(device_name)
    if entry is not None and dtype in entry.tflops:
        return entry.tflops[dtype] * 1e12, f"datasheet: {entry.name}, {entry.source}"
    if measured and measured.get(dtype):
        return float(measured[dtype]) * 1e12, f"measured matmul peak of {device_name!r} (hardware study)"
    raise ValueError(f"no peak FLOP/s for {dtype} on {device_name!r}: it is not in effllm_utils.metrics.DEVICE_PEAKS "
                     f"and no hardware-study record measured it; run the hardware study first "
                     f"(python -m effllm_utils.cli.reproduce --only hardware)")
