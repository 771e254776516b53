"""Telemetry: a `Monitor` window that samples memory, utilisation and power on a background thread.

    with Monitor() as mon:            # or: mon = Monitor(); mon.start(); ...; summary = mon.stop()
        train_steps()
    mon.summary["amu_gb"], mon.summary["energy_j"], mon.frame()   # summary dict, raw samples as a DataFrame

GPU (nvidia-ml-py): device memory used/total, utilization.gpu, power, and energy from the
`nvmlDeviceGetTotalEnergyConsumption` counter (Volta+); where the counter is unsupported or misbehaves, energy is the
integral of the power samples, and `energy_method` says which. torch.cuda peak allocated/reserved memory is reset at
the start. The window is CUDA-synchronised at both ends, so it covers the queued kernels, not only their launch.

CPU (psutil): process RSS and CPU percent. Energy from RAPL (/sys/class/powercap) when readable; otherwise energy is
None and `energy_reason` says why — never a TDP guess presented as a measurement.

A sample is taken synchronously when the window opens and when it closes, and every `period_s` in between; an NVML
error in the middle of a window is recorded in `errors` and the window still closes and reports what it has.

Memory that belongs to a run, not to the process or to the run before it:
- `release_memory()` (which `runs.execute` calls before every run) hands freed memory back — Python's garbage, torch's
  CUDA cache, glibc's free heap pages — so a measurement does not see the previous run's leftovers (on a GPU, NVML
  counts torch's cached blocks as used).
- `amu_growth_gb` / `peak_growth_gb`: what the window itself added above its first sample (torch's allocated bytes on
  CUDA, RSS on CPU). With `held_bytes(model, optimizer, ...)` — the memory those objects hold — a CPU run's own
  memory is held bytes + growth: the process's RSS cannot say it, as a Python process with torch and transformers
  holds ~0.5 GB before any model exists and grows by another ~0.25 GB of lazily imported code during its first run.
  `train` and `infer.measure` report that on CPU; on a GPU `amu_gb` is NVML's device memory used, as in the paper.

Long by design: the Monitor's sampler, memory attribution, NVML and RAPL readers belong together (one measurement
window).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from effllm_utils.core.runtime import release_memory, trim_heap  # noqa: F401 - part of this module's interface
from effllm_utils.measure import metrics

DEFAULT_PERIOD_S = 0.1


def held_bytes(*objs: Any) -> int:
    """Bytes of the distinct tensor storages the objects hold: a module's parameters and buffers; an optimizer's
    state; the tensors in the attributes of effllm's own objects (a decoder's fused weights and static KV cache), in
    dicts, lists and tuples; the inner tensors of quantized tensor subclasses (torchao) and of sparse tensors. A
    storage shared by several tensors (tied embeddings, views) counts once, as it occupies memory once; meta tensors
    count nothing; other objects (compiled functions, tokenizers) are not entered."""
    import torch

    seen, storages, total = set(), set(), 0
    stack = list(objs)
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if hasattr(type(o), "__tensor_flatten__"):  # a wrapper subclass: its data lives in inner tensors
                names, _ = o.__tensor_flatten__()
                stack.extend(getattr(o, n) for n in names)
                continue
            if o.layout != torch.strided:  # sparse: its index and value tensors
                stack.extend((o._indices(), o._values()) if o.layout == torch.sparse_coo else
                             (o.crow_indices(), o.col_indices(), o.values()) if o.layout == torch.sparse_csr else ())
                continue
            if o.is_meta:  # no memory behind it
                continue
            st = o.untyped_storage()
            key = (o.device, st.data_ptr())
            if key not in storages:
                storages.add(key)
                total += st.nbytes()
        elif isinstance(o, torch.nn.Module):
            stack.extend(o.parameters())
            stack.extend(o.buffers())
        elif isinstance(o, torch.optim.Optimizer):  # its state (AdamW's moments), not the parameters again
            stack.extend(o.state.values())
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif type(o).__module__.startswith("effllm_utils") and hasattr(o, "__dict__"):
            stack.extend(vars(o).values())
    return total


def own_memory(held: int, growth_gb: float, peak_growth_gb: float, method: str) -> dict[str, Any]:
    """A run's own memory from the bytes its objects hold (`held_bytes`) and what its timed work added above the
    window's start (a Monitor's `amu_growth_gb` / `peak_growth_gb`): amu_gb, amu_frac, peak_mem_gb, held_gb and
    `amu_method` (how it was attributed)."""
    amu = held / metrics.GB + growth_gb
    return {"amu_gb": amu, "amu_frac": amu * metrics.GB / psutil.virtual_memory().total,
            "peak_mem_gb": held / metrics.GB + peak_growth_gb, "held_gb": held / metrics.GB, "amu_method": method}


def _import_nvml():
    import pynvml  # nvidia-ml-py

    return pynvml


@dataclass
class _Gpu:
    index: int
    handle: Any
    name: str
    mem_total: int
    energy_start_mj: int | None = None
    energy_unsupported: str | None = None


class _Rapl:
    """Package-level RAPL energy counters (intel-rapl:N), accumulated sample to sample so wraps are handled."""

    def __init__(self, root: str | os.PathLike):
        self.reason: str | None = None
        self.domains: list[tuple[Path, int]] = []
        root = Path(root)
        paths = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1) if root.is_dir() else []
        if not paths:
            self.reason = f"no RAPL package domains under {root} (not an Intel/AMD Linux host, or powercap not loaded)"
            return
        try:
            for p in paths:
                self.domains.append((p / "energy_uj", int((p / "max_energy_range_uj").read_text())))
            self.last = self._read()
        except (OSError, ValueError) as e:
            self.domains, self.reason = [], f"RAPL counters not readable ({e}); run as root or make energy_uj readable"
        self.total_uj = 0

    def _read(self) -> list[int]:
        return [int(path.read_text()) for path, _ in self.domains]

    def update(self) -> None:
        now = self._read()
        for (_, max_range), before, after in zip(self.domains, self.last, now):
            self.total_uj += after - before if after >= before else after + max_range - before
        self.last = now


class Monitor:
    """A telemetry window. See the module docstring.

    device: "cpu", "cuda" or "cuda:N" — what the work runs on (None: cuda if available, else cpu). On CUDA the
      matching NVML device is monitored and the window is synchronised at both ends.
    nvml_indices: NVML device indices to monitor explicitly (e.g. every GPU of a node); default from `device`.
    nvml: the pynvml module to use (default: import nvidia-ml-py's pynvml); tests pass a stand-in.
    """

    def __init__(self, period_s: float = DEFAULT_PERIOD_S, device: str | None = None,
                 nvml_indices: list[int] | None = None, nvml: Any = None,
                 rapl_root: str | os.PathLike = "/sys/class/powercap"):
        if not period_s > 0:
            raise ValueError(f"period_s must be positive, got {period_s!r}")
        self.period_s = float(period_s)
        self.device = device or ("cuda" if _cuda_available() else "cpu")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {self.device!r}")
        self._nvml_module, self._nvml_indices, self._rapl_root = nvml, nvml_indices, rapl_root
        self._proc = psutil.Process()
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.summary: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Monitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Monitor":
        if self._thread is not None:
            raise RuntimeError("this Monitor is already running; create a new one per window")
        self.samples, self.errors, self.summary = [], [], None
        self._gpus, self._gpu_reason = self._open_gpus()
        self._rapl = _Rapl(self._rapl_root) if self.device == "cpu" else None
        self._proc.cpu_percent(None)  # prime: psutil's first call returns a meaningless 0.0
        self._alloc_start = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._alloc_start = torch.cuda.memory_allocated(self.device)
        for g in self._gpus:
            g.energy_start_mj = self._energy_counter(g)
        self._t0 = time.perf_counter()
        self._sampler_s = 0.0  # wall time the background thread spent sampling (its cost to the workload)
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="effllm-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Close the window (synchronising CUDA first) and return the summary. Safe to call once per start."""
        if self._thread is None:
            raise RuntimeError("Monitor.stop() called before start()")
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        self.summary = self._summarise(wall)
        return self.summary

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            t = time.perf_counter()
            self._sample()
            self._sampler_s += time.perf_counter() - t

    # -- sampling -------------------------------------------------------------------------------------------------
    def _error(self, where: str, exc: BaseException) -> None:
        msg = f"{where}: {type(exc).__name__}: {exc}"
        with self._lock:
            if msg not in self.errors:
                self.errors.append(msg)

    def _sample(self) -> None:
        s: dict[str, Any] = {"t_s": time.perf_counter() - self._t0}
        try:
            s["rss_bytes"] = self._proc.memory_info().rss
            s["cpu_pct"] = self._proc.cpu_percent(None)
        except psutil.Error as e:
            self._error("psutil", e)
        if self._alloc_start is not None:  # torch's allocated bytes: a host-side counter, no synchronisation
            import torch

            s["torch_alloc_bytes"] = torch.cuda.memory_allocated(self.device)
        if self._rapl is not None and self._rapl.domains:
            try:
                self._rapl.update()
            except (OSError, ValueError) as e:
                self._error("rapl", e)
        for g in self._gpus:
            for key, fn in (("mem_used_bytes", lambda h: self._nvml.nvmlDeviceGetMemoryInfo(h).used),
                            ("util_pct", lambda h: self._nvml.nvmlDeviceGetUtilizationRates(h).gpu),
                            ("power_w", lambda h: self._nvml.nvmlDeviceGetPowerUsage(h) / 1000.0)):
                try:
                    s[f"gpu{g.index}_{key}"] = fn(g.handle)
                except self._nvml.NVMLError as e:
                    self._error(f"NVML {key} on GPU {g.index}", e)
        with self._lock:
            self.samples.append(s)

    # -- NVML -----------------------------------------------------------------------------------------------------
    def _open_gpus(self) -> tuple[list[_Gpu], str | None]:
        if self.device == "cpu" and self._nvml_indices is None:
            return [], None
        try:
            self._nvml = self._nvml_module or _import_nvml()
            self._nvml.nvmlInit()
        except ImportError as e:
            return [], f"nvidia-ml-py is not installed ({e})"
        except Exception as e:  # pynvml.NVMLError_LibraryNotFound etc.: no driver on this host
            return [], f"NVML unavailable: {type(e).__name__}: {e}"
        indices = self._nvml_indices if self._nvml_indices is not None else [self._nvml_index_of_cuda_device()]
        gpus = []
        for i in indices:
            try:
                h = self._nvml.nvmlDeviceGetHandleByIndex(i)
                name = self._nvml.nvmlDeviceGetName(h)
                gpus.append(_Gpu(i, h, name.decode() if isinstance(name, bytes) else name,
                                 self._nvml.nvmlDeviceGetMemoryInfo(h).total))
            except self._nvml.NVMLError as e:
                raise RuntimeError(f"cannot open NVML device {i}: {e}") from e
        return gpus, None

    def _nvml_index_of_cuda_device(self) -> int:
        """The NVML index of the torch CUDA device (they differ under CUDA_VISIBLE_DEVICES): match by UUID."""
        import torch

        idx = torch.device(self.device).index
        props = torch.cuda.get_device_properties(torch.cuda.current_device() if idx is None else idx)
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:
            try:
                h = self._nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
                return self._nvml.nvmlDeviceGetIndex(h)
            except self._nvml.NVMLError:
                pass
        return idx or 0

    def _energy_counter(self, g: _Gpu) -> int | None:
        if g.energy_unsupported:
            return None
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(g.handle))  # mJ since driver load
        except self._nvml.NVMLError as e:
            g.energy_unsupported = f"{type(e).__name__}: {e}"
            return None

    # -- summary --------------------------------------------------------------------------------------------------
    def _series(self, key: str) -> tuple[list[float], list[float]]:
        pts = [(s["t_s"], s[key]) for s in self.samples if s.get(key) is not None]
        return [t for t, _ in pts], [v for _, v in pts]

    def _gpu_energy(self, g: _Gpu) -> tuple[float | None, str | None, str | None]:
        """(joules, method, reason) for one GPU over the window."""
        end = self._energy_counter(g) if g.energy_start_mj is not None else None
        if g.energy_start_mj is not None and end is not None and end >= g.energy_start_mj:
            return (end - g.energy_start_mj) / 1000.0, "nvml_energy_counter", None
        if g.energy_unsupported:
            why = f"energy counter unsupported ({g.energy_unsupported})"
        else:
            why = "energy counter went backwards (driver reloaded or GPU reset during the window)"
        t, p = self._series(f"gpu{g.index}_power_w")
        if len(p) >= 2:
            return metrics.integrate(p, t), "nvml_power_integration", why
        return None, None, why + "; fewer than two power samples to integrate"

    def _summarise(self, wall: float) -> dict[str, Any]:
        out: dict[str, Any] = {"wall_s": wall, "n_samples": len(self.samples), "period_s": self.period_s,
                               "sampler_duty_pct": 100.0 * self._sampler_s / wall if wall > 0 else None,
                               "device": self.device, "energy_j": None, "aec_w": None,
                               "energy_method": None, "energy_reason": None}
        t, cpu = self._series("cpu_pct")
        out["cpu_pct"] = metrics.time_average(cpu, t) if cpu else None
        t, rss = self._series("rss_bytes")
        out["rss_amu_gb"] = metrics.time_average(rss, t) / metrics.GB if rss else None
        out["rss_peak_gb"] = max(rss) / metrics.GB if rss else None
        out.update(self._growth(t, rss))
        if self._gpus:
            out.update(self._summarise_gpus(wall))
        else:
            out["amu_method"] = "process_rss"
            out["amu_gb"] = out["rss_amu_gb"]
            out["amu_frac"] = (metrics.time_average(rss, t) / psutil.virtual_memory().total) if rss else None
            out["peak_mem_gb"] = out["rss_peak_gb"]
            out["gpu_util_pct"] = None
            if self._gpu_reason:
                out["energy_reason"] = self._gpu_reason
            elif self._rapl is not None and self._rapl.domains:
                out["energy_j"] = self._rapl.total_uj / 1e6
                out["energy_method"] = "rapl"
            elif self._rapl is not None:
                out["energy_reason"] = self._rapl.reason
        if out["energy_j"] is not None and out["aec_w"] is None and wall > 0:
            out["aec_w"] = metrics.aec(out["energy_j"], wall)
        out["errors"] = list(self.errors)
        return out

    def _growth(self, t_rss: list[float], rss: list[float]) -> dict[str, Any]:
        """What the window added above its first sample: torch's allocated bytes on CUDA (the peak from torch's own
        counter), RSS on CPU."""
        if self._alloc_start is not None:
            import torch

            t, v = self._series("torch_alloc_bytes")
            peak = torch.cuda.max_memory_allocated(self.device) - self._alloc_start
            start = self._alloc_start
        else:
            t, v = t_rss, rss
            start = v[0] if v else 0
            peak = max(v) - start if v else None
        if not v:
            return {"amu_growth_gb": None, "peak_growth_gb": None}
        return {"amu_growth_gb": max(metrics.time_average(v, t) - start, 0) / metrics.GB,
                "peak_growth_gb": max(peak, 0) / metrics.GB}

    def _summarise_gpus(self, wall: float) -> dict[str, Any]:
        amu_gb, amu_frac, util, energy, methods, reasons, mem_max = [], [], [], [], set(), [], []
        per_device = {}
        for g in self._gpus:
            t, used = self._series(f"gpu{g.index}_mem_used_bytes")
            if used:
                a = metrics.amu(used, t, g.mem_total)
                amu_gb.append(a["amu_gb"])
                amu_frac.append(a["amu_frac"])
                mem_max.append(max(used) / metrics.GB)
            tu, u = self._series(f"gpu{g.index}_util_pct")
            if u:
                util.append(metrics.time_average(u, tu))
            e, method, reason = self._gpu_energy(g)
            energy.append(e)
            methods.add(method)
            if reason:
                reasons.append(f"GPU {g.index}: {reason}")
            per_device[f"gpu{g.index}"] = {"name": g.name, "mem_total_gb": g.mem_total / metrics.GB,
                                           "amu_gb": amu_gb[-1] if used else None, "energy_j": e,
                                           "energy_method": method}
        n = len(self._gpus)
        out: dict[str, Any] = {
            "device_name": self._gpus[0].name, "n_gpus": n, "per_gpu": per_device, "amu_method": "nvml_memory_used",
            # AMU is per device (the paper's tables): the mean over the monitored GPUs.
            "amu_gb": sum(amu_gb) / len(amu_gb) if amu_gb else None,
            "amu_frac": sum(amu_frac) / len(amu_frac) if amu_frac else None,
            "gpu_util_pct": sum(util) / len(util) if util else None,
            "peak_mem_gb": max(mem_max) if mem_max else None,
            "energy_reason": "; ".join(reasons) or None,
        }
        if self.device.startswith("cuda"):
            import torch

            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / metrics.GB
            out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / metrics.GB
        if all(e is not None for e in energy):
            # energy_j is for all monitored GPUs together; aec_w is per device, as the paper reports it.
            out["energy_j"] = sum(energy)
            out["aec_w"] = sum(energy) / n / wall if wall > 0 else None
            out["energy_method"] = "+".join(sorted(m for m in methods if m))
        return out

    def frame(self):
        """The raw samples as a pandas DataFrame (one row per sample, `t_s` seconds since the window opened)."""
        import pandas as pd

        with self._lock:
            return pd.DataFrame(self.samples)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
