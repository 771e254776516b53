"""`make bench` helpers that need no GPU."""
import pytest

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


def test_head_to_head_alternates_and_gives_the_ratio_with_its_interval(capsys):
    import math

    from effllm_utils.cli.cpu_decode import head_to_head

    calls, a, b = [], iter([10.0, 11.0, 9.0, 10.5]), iter([20.0, 21.0, 19.0, 20.0])

    def rate(name, it):
        return lambda: calls.append(name) or next(it)

    ratio, lo, hi = head_to_head("ours", rate("a", a), "anchor", rate("b", b), 4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # the order alternates every round
    want = math.exp(sum(map(math.log, [10, 11, 9, 10.5])) / 4 - sum(map(math.log, [20, 21, 19, 20])) / 4)
    assert ratio == pytest.approx(want) and lo < ratio < hi and 0.4 < lo and hi < 0.6
    assert "ours 10.2 vs anchor 20.0 tok/s (medians): ratio 0.5" in capsys.readouterr().out


def test_llama_cpp_decodes_the_packaged_gguf_greedily(tiny_package):
    """llama.cpp (when built: `make llama-cpp`) runs the same GGUF file the studies convert, greedy and timed."""
    from effllm_utils.engine import llamacpp
    from effllm_utils.models import packaged

    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed (make llama-cpp)")
    llm = llamacpp.load(packaged.gguf_path("tiny-gguf"), n_ctx=64)
    tokens, stamps = llamacpp.greedy_stamps(llm, [1, 5, 9, 13], 6)
    assert len(tokens) == 6 and stamps == sorted(stamps)
    assert llamacpp.greedy_stamps(llm, [1, 5, 9, 13], 6)[0] == tokens  # greedy: the same tokens again
    assert llamacpp.request_rate(llm, [1, 5, 9, 13], 6) > 0
