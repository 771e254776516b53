"""Telemetry against a stand-in for the pynvml library (no GPU here): the arithmetic, the energy-counter delta,
the fallbacks and errors in the middle of a window."""
import time
from types import SimpleNamespace

import pytest

from effllm_utils.telemetry import Monitor


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
