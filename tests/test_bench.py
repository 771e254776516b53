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


def test_cpu_decode_bench_on_a_packaged_gguf(tiny_package, monkeypatch, capsys):
    """`--mode decode --device cpu`: every precision of the static decoder side by side on one GGUF model, the
    kernels named, the ratios printed (llama.cpp left out: it is an optional build)."""
    from effllm_utils.engine import llamacpp

    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert bench.main(["--mode", "decode", "--device", "cpu", "--gguf", "tiny-gguf", "--new-tokens", "6",
                       "--repeats", "1", "--no-compile", "--skip-eager", "--prompt-len", "8"]) == 0
    out = capsys.readouterr().out
    for row, kernel in (("static_fp32", "F.linear (float32)"), ("static_bf16", "F.linear (bfloat16)"),
                        ("static_int8", "int8pack"), ("static_int4", "tinygemm")):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(row + " "))
        assert f"kernel: {kernel}" in line and float(line.split()[1]) > 0
    assert "static_int4 / static_fp32 tokens/s: " in out and "not installed (make llama-cpp" in out
