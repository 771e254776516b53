import pytest

from effllm_utils.core import provenance, runs
from effllm_utils.measure import hardware, metrics


def test_matmul_peak_is_the_best_measurement_over_interleaved_rounds(monkeypatch):
    """A slow spell (calls 2-4 of 6 at a third of the speed) must not set the peak: sizes alternate within each
    round, and the peak is the best single measurement."""
    calls = []

    def fake(n, dtype, device, min_time_s, min_reps):
        assert min_reps == 1  # a product that outlasts min_time_s is timed once (bf16 on an AVX2 CPU: ~2 s at 1024)
        calls.append(n)
        return (1.0 if n == 64 else 0.5) / (3 if 2 <= len(calls) <= 4 else 1)

    monkeypatch.setattr(hardware, "matmul_tflops", fake)
    mm = hardware.matmul_sweep([32, 64], "fp32", "cpu", min_time_s=0.01, repeats=3)
    assert calls == [32, 64, 32, 64, 32, 64]
    assert mm["metrics"] == {"matmul_tflops": 1.0, "best_n": 64}
    # the 64 product's median (1/3) fell in the slow spell: the old median-based peak would have read 0.5 at n=32
    assert mm["artifacts"]["tflops_min"] == [0.5 / 3, 1 / 3] and mm["artifacts"]["tflops_median"] == [0.5, 1 / 3]


def test_measurements_are_positive_and_shaped():
    mm = hardware.matmul_sweep([32, 64], "fp32", "cpu", min_time_s=0.01, repeats=2)
    assert mm["metrics"]["matmul_tflops"] > 0 and mm["artifacts"]["sizes"] == [32, 64]
    assert mm["metrics"]["matmul_tflops"] == max(mm["artifacts"]["tflops_max"])
    bw = hardware.memory_bandwidth(4, "cpu", min_time_s=0.01, repeats=2)
    assert bw["metrics"]["mem_bw_gbs"] == max(bw["artifacts"]["mem_bw_gbs_samples"]) > 0
    idle = hardware.idle_power(0.05, "cpu", 0.01)
    assert idle["metrics"]["idle_power_w"] is None or idle["metrics"]["idle_power_w"] > 0
    assert idle["metrics"]["idle_power_w"] is not None or idle["artifacts"]["energy_reason"]
    ov = hardware.telemetry_overhead("cpu", 0.01, block_s=0.05, pairs=2, width=32, batch=4)
    assert set(ov["metrics"]) >= {"telemetry_overhead_pct", "sampler_duty_pct", "step_s_on", "step_s_off"}
    assert len(ov["artifacts"]["step_s_on"]) == 2 and 0 <= ov["metrics"]["sampler_duty_pct"] < 50
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        hardware.matmul_tflops(8, "int3", "cpu")


def test_measured_peak_is_used_for_devices_outside_the_table(outputs):
    env = provenance.environment()
    rec = runs.execute("hardware", "matmul_fp32", "tiny", {}, lambda: {"metrics": {"matmul_tflops": 0.25}},
                       verbose=False)
    assert rec.status == "ok"
    peaks = hardware.measured_peaks("tiny", env["device_name"])
    assert peaks == {"fp32": 0.25}
    value, source = metrics.peak_flops(env["device_name"], "fp32", measured=peaks)
    assert value == pytest.approx(0.25e12) and "measured" in source
    assert hardware.measured_peaks("tiny", "some other CPU") == {}
    # a later record of other (stale) hardware code does not replace the current code's peak
    later = runs.RunRecord(**{**rec.__dict__, "run_id": "hardware--matmul_fp32--x--0ther", "code_version": "0ther0de",
                              "started_at": "2099-01-01T00:00:00+00:00", "metrics": {"matmul_tflops": 9.0}})
    runs.atomic_write_text(runs.runs_dir("tiny", "hardware") / f"{later.run_id}.json", later.to_json())
    assert hardware.measured_peaks("tiny", env["device_name"]) == {"fp32": 0.25}
