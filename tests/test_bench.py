"""`make bench` helpers that need no GPU."""
from effllm_utils.cli import bench


def test_last_period_finds_one_decode_step_not_one_layer():
    layer = ["norm", "gemv", "rope", "sdpa", "gemv", "norm", "gemv", "silu", "gemv"]
    step = ["embedding"] + layer * 4 + ["norm", "lm_head", "max", "argmax"]
    names = ["prefill_a", "prefill_b"] + step * 3
    assert bench.last_period(names) == len(step)
    assert bench.last_period(["a", "b", "c"]) is None


def test_mamba_cases_compare_the_scans_and_restore_the_routing(capsys):
    from transformers.models.mamba import modeling_mamba as mm

    assert bench.main(["--device", "cpu", "--cases", "mamba,mamba_library", "--batch", "2", "--seq", "16",
                       "--steps", "2", "--skip", "1"]) == 0
    out = capsys.readouterr().out
    assert "\nmamba " in out and "\nmamba_library " in out
    assert "Mamba tokens/s, effllm CPU sequential selective scan" in out and "transformers' own scan: " in out
    assert getattr(mm.mamba_selective_scan, "_effllm_original", None) is not None  # effllm's routing is back
