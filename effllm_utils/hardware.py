"""The `hardware` study's measurements: matmul peak, memory bandwidth, idle power and telemetry overhead.

Every other study divides achieved FLOP/s by a device peak; for a device that is not in the datasheet table
(`metrics.DEVICE_PEAKS` — every CPU) the peak measured here is used (`measured_peaks`).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

from . import runs
from .runtime import synchronize
from .telemetry import Monitor

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
            vals[n].append(matmul_tflops(n, dtype, device, min_time_s))
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
    """Step-time increase when the Monitor samples at `period_s`, from interleaved blocks without/with it.

    Blocks alternate (off, on, off, on, ...) so drift hits both; the estimate is the median over pairs of
    (t_on / t_off - 1), with the inter-quartile range of the pair ratios beside it. On a shared machine that A/B
    estimate is noisy (a few %), so the Monitor's own cost is also recorded directly: `sampler_duty_pct`, the
    share of the window the sampler thread spent taking samples — the CPU time it took from the workload."""
    step = _reference_step(device, width, batch)
    step_s = time_repeated(step, device, 0.3, 3)
    steps_per_block = max(3, int(block_s / step_s))
    off, on, duty = [], [], []
    for _ in range(pairs):
        off.append(time_repeated(step, device, 0.0, steps_per_block, warmup=1))
        with Monitor(period_s=period_s, device=device) as mon:
            on.append(time_repeated(step, device, 0.0, steps_per_block, warmup=1))
        duty.append(mon.summary["sampler_duty_pct"])
    ratios = np.array(on) / np.array(off) - 1
    return {"metrics": {"telemetry_overhead_pct": 100 * float(np.median(ratios)),
                        "overhead_pct_q25": 100 * float(np.percentile(ratios, 25)),
                        "overhead_pct_q75": 100 * float(np.percentile(ratios, 75)),
                        "sampler_duty_pct": float(np.median(duty)),
                        "step_s_off": float(np.median(off)), "step_s_on": float(np.median(on)),
                        "steps_per_block": steps_per_block, "samples_per_block": mon.summary["n_samples"]},
            "artifacts": {"step_s_off": off, "step_s_on": on}}


def measured_peaks(profile: str, device_name: str) -> dict[str, float]:
    """{dtype: TFLOP/s} measured by the hardware study on `device_name` (empty if it never ran there)."""
    df = runs.load_runs(profile, "hardware", status="ok")
    if df.empty or "matmul_tflops" not in df:
        return {}
    df = df[(df["env.device_name"] == device_name) & df["technique"].str.startswith("matmul_")]
    return {t.removeprefix("matmul_"): float(v) for t, v in zip(df["technique"], df["matmul_tflops"])}


def figures(profile: str, study: str = "hardware") -> list:
    """The hardware study's figure, drawn from its records only."""
    import matplotlib.pyplot as plt

    from . import plotting

    recs = {r.technique: r for r in runs.load_records(profile, "hardware") if r.status == "ok"}
    if not recs:
        return []
    plotting.use_style()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), layout="constrained")
    for tech in ("matmul_fp32", "matmul_bf16", "matmul_fp16"):
        if tech in recs:
            a = recs[tech].artifacts
            axes[0].errorbar(a["sizes"], a["tflops_median"],
                             yerr=[np.subtract(a["tflops_median"], a["tflops_min"]),
                                   np.subtract(a["tflops_max"], a["tflops_median"])],
                             marker="o", capsize=3, color=plotting.technique_color(tech), label=tech)
    axes[0].set(xscale="log", yscale="log", xlabel="matrix size n", ylabel="TFLOP/s", title="matmul throughput")
    axes[0].legend()
    if "memory_bandwidth" in recs:
        plotting.bar(axes[1], ["memory_bandwidth"], [recs["memory_bandwidth"].metrics["mem_bw_gbs"]], "GB/s")
    axes[1].set_title("copy bandwidth")
    if "telemetry_overhead" in recs:
        r = recs["telemetry_overhead"]
        m = r.metrics
        plotting.bar(axes[2], ["A/B step time", "sampler duty"], [m["telemetry_overhead_pct"], m["sampler_duty_pct"]],
                     "overhead (% of step time)", value_fmt="{:.3f}%",
                     errors=[[m["telemetry_overhead_pct"] - m["overhead_pct_q25"], 0],
                             [m["overhead_pct_q75"] - m["telemetry_overhead_pct"], 0]])
        axes[2].axhline(1.0, color="0.5", ls=":", lw=1)
        axes[2].set_title(f"telemetry overhead at {r.params.get('telemetry_period_s')} s period")
    device = next(iter(recs.values())).environment.get("device_name", "?")
    fig.suptitle(f"hardware calibration — {device}", fontsize=10)
    if "idle_power" in recs:
        w = recs["idle_power"].metrics.get("idle_power_w")
        fig.supxlabel(f"idle power: {w:.1f} W" if w is not None else
                      f"idle power not measurable: {recs['idle_power'].artifacts.get('energy_reason')}", fontsize=8)
    paths = plotting.savefig(fig, "hardware_calibration", profile)
    plt.close(fig)
    return paths
