"""Calibration measurements (the `hardware` study): matmul peak, memory bandwidth, idle power, telemetry overhead;
and the device peak FLOP/s every study's PCU/MFU divides by (datasheet, else this study's measured peak).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

from effllm_utils.core import provenance
from effllm_utils.core.runtime import synchronize
from effllm_utils.measure import metrics
from effllm_utils.measure.telemetry import Monitor

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def time_repeated(fn: Callable[[], Any], device: str, min_time_s: float, min_reps: int, warmup: int = 2) -> float:
    """Seconds per call of `fn`, repeating until both `min_time_s` and `min_reps` are reached (warm-up excluded)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_time_s:
        fn()
        reps += 1
        if reps % 8 == 0 or reps >= min_reps:
            synchronize(device)
    synchronize(device)
    return (time.perf_counter() - t0) / reps


def matmul_tflops(n: int, dtype: str, device: str, min_time_s: float = 0.5, min_reps: int = 2) -> float:
    """Dense n x n @ n x n throughput in TFLOP/s (2 n^3 FLOPs per product)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=_torch_dtype(dtype))
    b = torch.randn(n, n, device=device, dtype=_torch_dtype(dtype))
    c = torch.empty(n, n, device=device, dtype=_torch_dtype(dtype))
    s = time_repeated(lambda: torch.mm(a, b, out=c), device, min_time_s, min_reps, warmup=1)
    return 2 * n**3 / s / 1e12


def matmul_sweep(sizes: list[int], dtype: str, device: str, min_time_s: float, repeats: int) -> dict[str, Any]:
    """Throughput per size over `repeats` rounds, each round measuring every size once (so a slow spell on a shared
    machine touches every size, not all the repeats of one). The peak is the best single measurement: contention only
    slows a product down, so the best one is the closest to what the device can do, and a median taken in a slow
    spell would understate the peak and inflate every MFU/PCU computed against it."""
    vals: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            # min_reps 1: one product may outlast min_time_s (bf16 on an AVX2 CPU: ~2 s at n=1024)
            vals[n].append(matmul_tflops(n, dtype, device, min_time_s, min_reps=1))
    per_size = {n: {"median": statistics.median(v), "min": min(v), "max": max(v)} for n, v in vals.items()}
    best = max(per_size, key=lambda n: per_size[n]["max"])
    return {"metrics": {"matmul_tflops": per_size[best]["max"], "best_n": best},
            "artifacts": {"sizes": list(per_size), "tflops_median": [v["median"] for v in per_size.values()],
                          "tflops_min": [v["min"] for v in per_size.values()],
                          "tflops_max": [v["max"] for v in per_size.values()]}}


def memory_bandwidth(mbytes: int, device: str, min_time_s: float, repeats: int) -> dict[str, Any]:
    """Copy bandwidth in GB/s: a `mbytes` MB buffer copied into another (bytes read + bytes written); the best of
    `repeats` measurements, a peak for the same reason as `matmul_sweep`'s (it is the decode roofline's denominator)."""
    import torch

    n = mbytes * 1_000_000 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    vals = [2 * n * 4 / time_repeated(lambda: dst.copy_(src), device, min_time_s, 3) / 1e9 for _ in range(repeats)]
    return {"metrics": {"mem_bw_gbs": max(vals), "buffer_mb": mbytes},
            "artifacts": {"mem_bw_gbs_samples": vals}}


def idle_power(seconds: float, device: str, period_s: float) -> dict[str, Any]:
    """Average power of the device doing nothing, where the platform can measure it (NVML, RAPL)."""
    with Monitor(period_s=period_s, device=device) as mon:
        time.sleep(seconds)
    s = mon.summary
    return {"metrics": {"idle_power_w": s["aec_w"], "energy_j": s["energy_j"], "wall_s": s["wall_s"]},
            "artifacts": {"energy_method": s["energy_method"], "energy_reason": s["energy_reason"],
                          "errors": s["errors"]}}


def _reference_step(device: str, width: int, batch: int):
    """A small MLP training step (forward, backward, AdamW), the workload the telemetry overhead is measured on."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                torch.nn.Linear(4 * width, width)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, width, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()
    return step


def telemetry_overhead(device: str, period_s: float, block_s: float, pairs: int, width: int,
                       batch: int) -> dict[str, Any]:
    """Step-time increase with the instrumentation every training run carries — the Monitor sampling at `period_s`
    and a progress bar advanced after each step (as `engine.train` does) — from interleaved blocks without/with it.

    Blocks alternate (off, on, off, on, ...) so drift hits both; the estimate is the median over pairs of
    (t_on / t_off - 1), with the inter-quartile range of the pair ratios beside it. On a shared machine that A/B
    estimate is noisy (a few %), so the Monitor's own cost is also recorded directly: `sampler_duty_pct`, the
    share of the window the sampler thread spent taking samples — the CPU time it took from the workload."""
    step = _reference_step(device, width, batch)
    step_s = time_repeated(step, device, 0.3, 3)
    steps_per_block = max(3, int(block_s / step_s))
    import io

    from effllm_utils.core import progress

    # rendered (and published to the batch runner) like a run's bar, into a buffer
    bar = progress.bar(text=True, file=io.StringIO(), mininterval=1.0, unit="step")

    def instrumented():
        step()
        bar.update(1)

    off, on, duty = [], [], []
    for _ in range(pairs):
        off.append(time_repeated(step, device, 0.0, steps_per_block, warmup=1))
        with Monitor(period_s=period_s, device=device) as mon:
            on.append(time_repeated(instrumented, device, 0.0, steps_per_block, warmup=1))
        duty.append(mon.summary["sampler_duty_pct"])
    bar.close()
    ratios = np.array(on) / np.array(off) - 1
    return {"metrics": {"telemetry_overhead_pct": 100 * float(np.median(ratios)),
                        "overhead_pct_q25": 100 * float(np.percentile(ratios, 25)),
                        "overhead_pct_q75": 100 * float(np.percentile(ratios, 75)),
                        "sampler_duty_pct": float(np.median(duty)),
                        "step_s_off": float(np.median(off)), "step_s_on": float(np.median(on)),
                        "steps_per_block": steps_per_block, "samples_per_block": mon.summary["n_samples"]},
            "artifacts": {"step_s_off": off, "step_s_on": on}}


def measured_peaks(profile: str, device_name: str) -> dict[str, float]:
    """{dtype: TFLOP/s} measured by the hardware study on `device_name` (empty if it never ran there): per dtype the
    newest record of the current hardware code, else the newest of any (a stale record's peak beats none)."""
    from effllm_utils.core import runs

    recs = [r for r in runs.load_records(profile, "hardware") if r.status == "ok"
            and r.technique.startswith("matmul_") and r.metrics.get("matmul_tflops") is not None
            and r.environment.get("device_name") == device_name]
    current = provenance.code_version("hardware")
    recs.sort(key=lambda r: (r.code_version == current, r.started_at))  # the last one per dtype wins
    return {r.technique.removeprefix("matmul_"): float(r.metrics["matmul_tflops"]) for r in recs}


def device_peak(profile: str, device: str, precision: str) -> tuple[float | None, str]:
    """Peak FLOP/s for PCU: the datasheet, else the hardware study's measured peak, else None with the reason."""
    name = provenance.device_name()
    dtype = "bf16" if precision == "bf16" or (precision == "auto" and device.startswith("cuda")) else "fp32"
    try:
        return metrics.peak_flops(name, dtype, measured=measured_peaks(profile, name))
    except ValueError as e:
        return None, str(e)
