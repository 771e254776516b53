"""Telemetry against a stand-in for the pynvml library (no GPU here): the arithmetic, the energy-counter delta,
the fallbacks and errors in the middle of a window."""
import time
from types import SimpleNamespace

import pytest
import torch  # loaded before any run's baseline, as in a study (its import alone is ~0.2 GB of RSS)

from effllm_utils.measure.telemetry import Monitor


class FakeNVML:
    """Implements the NVML calls Monitor uses. Power is constant; the energy counter advances with real time
    (mJ = W x ms) from `energy_base`, unless `energy_values` scripts the reads."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def __init__(self, power_w=200.0, used=40e9, total=80e9, util=50, energy_base=10**12, energy_values=None,
                 energy_supported=True, fail_memory_after=None, init_error=None):
        self.power_w, self.used, self.total, self.util = power_w, used, total, util
        self.energy_base, self.energy_values = energy_base, list(energy_values or [])
        self.energy_supported, self.fail_memory_after, self.init_error = energy_supported, fail_memory_after, init_error
        self.t0 = time.perf_counter()
        self.memory_calls = 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"handle{i}"

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h):
        self.memory_calls += 1
        if self.fail_memory_after is not None and self.memory_calls > self.fail_memory_after:
            raise self.NVMLError("GPU is lost")
        return SimpleNamespace(used=int(self.used), total=int(self.total), free=int(self.total - self.used))

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self.util, memory=10)

    def nvmlDeviceGetPowerUsage(self, h):
        return int(self.power_w * 1000)  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.energy_supported:
            raise self.NVMLError_NotSupported("Not Supported")
        if self.energy_values:
            return self.energy_values.pop(0)
        return self.energy_base + int(self.power_w * (time.perf_counter() - self.t0) * 1000)


def window(nvml, seconds=0.3, period_s=0.02, **kw):
    with Monitor(period_s=period_s, device="cpu", nvml_indices=[0], nvml=nvml, **kw) as mon:
        time.sleep(seconds)
    return mon.summary


def test_energy_from_counter_delta_and_memory_arithmetic():
    s = window(FakeNVML(power_w=200.0))
    assert s["energy_method"] == "nvml_energy_counter"
    assert s["energy_j"] == pytest.approx(200.0 * s["wall_s"], rel=0.05)
    assert s["aec_w"] == pytest.approx(200.0, rel=0.05)
    assert s["amu_gb"] == pytest.approx(40.0) and s["amu_frac"] == pytest.approx(0.5)
    assert s["gpu_util_pct"] == pytest.approx(50.0)
    assert s["device_name"] == "NVIDIA H100 80GB HBM3" and s["errors"] == []
    assert s["n_samples"] >= 5


def test_counter_delta_is_exact_integer_arithmetic_near_2_63():
    base = 2**63 - 10**6  # a float would lose the last digits of this
    s = window(FakeNVML(energy_values=[base, base + 12_345]), seconds=0.05)
    assert s["energy_j"] == 12.345
    assert s["energy_method"] == "nvml_energy_counter"


def test_missing_counter_falls_back_to_integrating_power():
    s = window(FakeNVML(power_w=150.0, energy_supported=False))
    assert s["energy_method"] == "nvml_power_integration"
    assert s["energy_j"] == pytest.approx(150.0 * s["wall_s"], rel=0.02)
    assert "energy counter unsupported" in s["energy_reason"]


def test_counter_going_backwards_falls_back_to_integration():
    s = window(FakeNVML(power_w=100.0, energy_values=[5_000_000, 1_000]))
    assert s["energy_method"] == "nvml_power_integration"
    assert "went backwards" in s["energy_reason"]
    assert s["energy_j"] == pytest.approx(100.0 * s["wall_s"], rel=0.02)


def test_nvml_error_mid_run_still_closes_the_window():
    nvml = FakeNVML(fail_memory_after=3)  # 1 call at open for the total, then 2 good samples, then failures
    s = window(nvml, seconds=0.2)
    assert any("GPU is lost" in e for e in s["errors"])
    assert len(s["errors"]) == 1  # the same error is reported once, not per sample
    assert s["amu_gb"] == pytest.approx(40.0)  # from the samples taken before the failure
    assert s["energy_j"] is not None and s["wall_s"] > 0.15


def test_nvml_library_missing_reports_reason_not_a_number():
    s = window(FakeNVML(init_error=FakeNVML.NVMLError("NVML Shared Library Not Found")))
    assert s["energy_j"] is None and s["aec_w"] is None
    assert "NVML unavailable" in s["energy_reason"] and "Library Not Found" in s["energy_reason"]
    assert s["amu_gb"] > 0  # falls back to process memory


def test_cpu_window_without_rapl(tmp_path):
    with Monitor(period_s=0.02, device="cpu", rapl_root=tmp_path / "none") as mon:
        x = bytearray(50_000_000)  # noqa: F841 - memory the window should see
        time.sleep(0.1)
    s = mon.summary
    assert s["energy_j"] is None and "no RAPL package domains" in s["energy_reason"]
    assert s["peak_mem_gb"] >= 0.05 and 0 < s["amu_gb"] <= s["peak_mem_gb"]
    assert 0 < s["amu_frac"] < 1 and s["gpu_util_pct"] is None
    assert 0 <= s["sampler_duty_pct"] < 5
    df = mon.frame()
    assert list(df.columns[:3]) == ["t_s", "rss_bytes", "cpu_pct"] and df["t_s"].is_monotonic_increasing


def _rapl(root, energy, max_range=1000):
    d = root / "intel-rapl:0"
    d.mkdir(parents=True, exist_ok=True)
    (d / "energy_uj").write_text(str(energy))
    (d / "max_energy_range_uj").write_text(str(max_range))
    (root / "intel-rapl:0:0").mkdir(exist_ok=True)  # a sub-domain (core): must not be double counted


def test_rapl_counter_with_wraparound(tmp_path):
    _rapl(tmp_path, 900)
    mon = Monitor(period_s=10.0, device="cpu", rapl_root=tmp_path).start()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("100")  # wrapped: +200 uJ
    mon._sample()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("300")  # +200 uJ
    s = mon.stop()
    assert s["energy_method"] == "rapl" and s["energy_j"] == pytest.approx(400e-6)


def test_unreadable_rapl_says_why(tmp_path):
    d = tmp_path / "intel-rapl:0"
    d.mkdir()
    (d / "energy_uj").write_text("not a number")
    (d / "max_energy_range_uj").write_text("1000")
    with Monitor(period_s=1.0, device="cpu", rapl_root=tmp_path) as mon:
        pass
    assert mon.summary["energy_j"] is None and "not readable" in mon.summary["energy_reason"]


def test_bad_use_is_a_clear_error():
    with pytest.raises(ValueError, match="period_s must be positive"):
        Monitor(period_s=0)
    with pytest.raises(ValueError, match="device must be"):
        Monitor(device="tpu")
    with pytest.raises(RuntimeError, match="before start"):
        Monitor(device="cpu").stop()


# -- memory that belongs to a run -------------------------------------------------------------------------------

def _touch(n_bytes):
    return torch.ones(n_bytes // 4)  # written, so its pages are resident


def test_cpu_window_reports_the_process_and_what_the_window_added(tmp_path):
    with Monitor(period_s=0.02, device="cpu", rapl_root=tmp_path) as mon:
        time.sleep(0.05)
    s = mon.summary
    assert s["amu_method"] == "process_rss" and s["amu_gb"] == s["rss_amu_gb"] and s["peak_mem_gb"] == s["rss_peak_gb"]
    assert s["amu_growth_gb"] is not None and s["peak_growth_gb"] >= 0


RELEASE_SCRIPT = """
import json, time, torch
from effllm_utils.measure import telemetry
from effllm_utils.measure.telemetry import Monitor

def run(n_bytes, chunks, release):
    if release:
        telemetry.release_memory()
    with Monitor(period_s=0.02, device="cpu") as mon:
        xs = [torch.ones(n_bytes // chunks // 4) for _ in range(chunks)]
        time.sleep(0.06)
    return mon.summary["peak_growth_gb"]

out = [run(300_000_000, 3000, True), run(40_000_000, 400, False)]
run(300_000_000, 3000, True)
out.append(run(40_000_000, 400, True))
print(json.dumps(out))
"""


def test_release_memory_keeps_the_previous_runs_heap_out_of_the_next():
    """A large run made of many small allocations (heap memory glibc keeps after free, unlike a large mmap), freed,
    then a small run: without release_memory the small run reuses the freed heap and its growth reads ~0; with it,
    its growth is its own size. In a subprocess with glibc's automatic trimming off (MALLOC_TRIM_THRESHOLD_), so the
    allocator's state is the worst case, not whatever earlier tests left."""
    import json
    import os
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's heap")
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_=str(2**40), MALLOC_MMAP_THRESHOLD_=str(2**20))
    res = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    big, small_kept, small_released = json.loads(res.stdout.strip().splitlines()[-1])
    assert big > 0.28  # 100 kB each: heap, below the mmap threshold
    assert small_kept < 0.01
    assert 0.035 < small_released < 0.1


def test_window_growth_is_what_the_window_added(tmp_path):
    held = _touch(100_000_000)  # noqa: F841 - resident before the window: not growth
    with Monitor(period_s=0.02, device="cpu", rapl_root=tmp_path) as mon:
        time.sleep(0.03)
        y = _touch(150_000_000)
        time.sleep(0.1)
        del y
    s = mon.summary
    assert 0.14 < s["peak_growth_gb"] < 0.2
    assert 0 < s["amu_growth_gb"] < s["peak_growth_gb"]


def test_held_bytes_counts_each_storage_once():
    from effllm_utils.measure.telemetry import held_bytes

    emb = torch.nn.Embedding(1000, 64)
    head = torch.nn.Linear(64, 1000, bias=False)
    head.weight = emb.weight  # tied, as Qwen2.5-0.5B/1.5B are
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    model.register_buffer("scale", torch.ones(10, dtype=torch.float16))
    assert held_bytes(model) == 1000 * 64 * 4 + 10 * 2
    cache = {"k": [torch.zeros(4, 8)], "v": (torch.zeros(4, 8),), "view": emb.weight[:10]}  # the view: no new memory
    assert held_bytes(model, cache) == held_bytes(model) + 2 * 4 * 8 * 4
    assert held_bytes(object(), "text", 3) == 0  # other objects are not entered
    assert held_bytes(torch.empty(1000, device="meta")) == 0
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.tensor([1.0, 2.0]), (2, 2),
                                     check_invariants=True).coalesce()
    assert held_bytes(sparse) == 2 * 2 * 8 + 2 * 4  # int64 indices [2, nnz] and float32 values [nnz]
    assert held_bytes(sparse.to_sparse_csr()) >= 3 * 8 + 2 * 8 + 2 * 4  # row pointers, columns, values


def test_held_bytes_of_a_torchao_int8_model_counts_its_inner_tensors():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from effllm_utils.measure.telemetry import held_bytes

    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False))
    fp32 = held_bytes(model)
    quantize_(model, Int8WeightOnlyConfig())
    int8 = held_bytes(model)
    assert fp32 == 256 * 512 * 4
    assert 256 * 512 <= int8 < 256 * 512 * 1.1  # int8 data and per-row scales, not the fp32 weight


def test_release_memory_trims_the_c_heap_on_linux():
    import sys

    from effllm_utils.measure import telemetry

    if not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim is glibc's")
    assert telemetry.trim_heap() is True
    telemetry.release_memory()  # and runs without CUDA initialised


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_window_growth_from_torchs_allocator():
    from effllm_utils.measure import telemetry

    held = torch.ones(50_000_000, device="cuda")  # noqa: F841 - resident before the window: not growth
    telemetry.release_memory()
    with Monitor(period_s=0.02, device="cuda") as mon:
        y = torch.ones(100_000_000, device="cuda")  # 400 MB
        torch.cuda.synchronize()
        time.sleep(0.1)
        del y
    s = mon.summary
    assert 0.39 < s["peak_growth_gb"] < 0.45 and 0 < s["amu_growth_gb"] < s["peak_growth_gb"]
    assert s["peak_mem_gb"] > 0.59  # torch's peak allocated: the 200 MB held and the 400 MB tensor
    if s.get("amu_method") == "nvml_memory_used":  # NVML readable: AMU is the device's memory used
        assert s["amu_gb"] > 0.6
