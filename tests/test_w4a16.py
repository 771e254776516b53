"""effllm's Triton kernels — W4A16 (`effllm_utils.w4a16`) against the dequantized reference, the dense GEMV
(`effllm_utils.gemv`) against F.linear: on CPU through Triton's interpreter (a subprocess with TRITON_INTERPRET=1,
read when the kernels are defined), on CUDA natively."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from effllm_utils import models
from effllm_utils.engine import decode, w4a16
from effllm_utils.models import EffLLMForCausalLM


def test_pack_roundtrip_and_layout():
    torch.manual_seed(0)
    q, sz = decode.quantize_int4(torch.randn(24, 256), 64)
    words, rows = w4a16.pack(q, sz)
    assert words.shape == (24, 32) and words.dtype == torch.int32 and rows.shape == (24, 4, 2)
    assert torch.equal(w4a16.unpack(words, 64), q)
    # within a group of 64 columns (8 words), nibble j of word w is column 8 j + w; the low nibble first
    w0, w9 = int(words[0, 0]), int(words[0, 9])  # word 9 = group 1, word 1
    assert w0 & 0xF == int(q[0, 0]) and (w0 >> 4) & 0xF == int(q[0, 8]) and (w0 >> 28) & 0xF == int(q[0, 56])
    assert w9 & 0xF == int(q[0, 65]) and (w9 >> 8) & 0xF == int(q[0, 64 + 16 + 1])
    assert torch.equal(rows[5, 2], sz[2, 5])
    with pytest.raises(ValueError, match="divisible by 8"):
        w4a16.pack(torch.zeros(2, 12, dtype=torch.int32), torch.zeros(1, 2, 2))


def test_kernel_choice_errors():
    with pytest.raises(ValueError, match="int4 kernel must be one of"):
        decode.int4_kernel("marlin", "cpu")
    assert decode.int4_kernel("tinygemm", "cpu") == "tinygemm"
    with pytest.raises(ValueError,
                       match="GemLite's int4 kernels need a CUDA GPU of compute capability >= 8.0 and the gemlite"):
        decode.int4_kernel("gemlite", "cpu")
    m = EffLLMForCausalLM(models.config("test", attention="gqa")).eval()
    with pytest.raises(ValueError, match="dense kernel must be one of"):
        decode.StaticDecoder(m, 1, 16, dense_kernel="cutlass")
    # the default picks the Triton GEMV only for bf16/fp16 on CUDA: cuBLAS on CPU (also under the interpreter)
    assert decode.StaticDecoder(m, 1, 16).layers[0]["qkv"].kernel == "cublas"
    assert decode.StaticDecoder(m.to(torch.bfloat16), 1, 16).lm_head.kernel == "cublas"
    if not w4a16.available("cpu"):
        with pytest.raises(ValueError, match="Triton W4A16 kernel cannot run on cpu"):
            decode.int4_kernel("triton", "cpu")
        with pytest.raises(ValueError, match="the Triton GEMV cannot run on cpu"):
            decode.StaticDecoder(m, 1, 16, dense_kernel="triton")


_INTERPRETED = textwrap.dedent("""
    import torch
    from effllm_utils.engine import decode, w4a16
    from effllm_utils import models
    from effllm_utils.models import EffLLMForCausalLM
    assert w4a16.available("cpu")
    torch.manual_seed(0)
    def err(a, b):
        return ((a.float() - b).norm() / b.norm()).item()
    # gemv (M <= 8) in bf16 and fp16, gemm (M > 8) in fp16 (the interpreter's numpy has no bf16 dot);
    # N not a multiple of the block, groups not a multiple of the groups per step
    for M, N, K, g, dt in [(1, 44, 384, 128, torch.bfloat16), (3, 40, 320, 64, torch.float16),
                           (8, 16, 96, 32, torch.bfloat16), (20, 72, 512, 128, torch.float16),
                           (1, 24, 8320, 128, torch.bfloat16)]:  # the last: 65 groups in 8 slices of 9 (ragged)
        assert (M, N, K) != (1, 24, 8320) or w4a16.splits("gemv", N, K, g) == 8, w4a16.splits("gemv", N, K, g)
        q, sz = decode.quantize_int4(torch.randn(N, K), g)
        words, rows = w4a16.pack(q, sz)
        x = torch.randn(M, K).to(dt)
        ref = x.float() @ decode.dequantize_int4(q, sz, g).t()
        y = w4a16.matmul(x, words, rows, g)
        assert y.shape == (M, N) and y.dtype == dt, (y.shape, y.dtype)
        e = err(y, ref)
        assert e < 8e-3, (M, N, K, g, dt, e)
    # the tensor-core gemm also on few rows (what a GPU may choose for decoding: `_choose` times both)
    for M in (1, 5):
        q, sz = decode.quantize_int4(torch.randn(40, 256), 64)
        words, rows = w4a16.pack(q, sz)
        x = torch.randn(M, 256).to(torch.float16)
        y = torch.empty(1, M, 40)
        w4a16._launch("gemm", x, words, rows, y, 64)
        e = err(y[0], x.float() @ decode.dequantize_int4(q, sz, 64).t())
        assert e < 8e-3, (M, e)
    for args, msg in [((torch.randn(1, 128), words, rows, 64, "gemv"), "W4A16 shapes do not agree"),
                      ((torch.randn(9, 256), words, rows, 64, "gemv"), "'gemv' for at most 8 rows"),
                      ((torch.randn(1, 256), words, rows, 64, "gemvv"), "W4A16 kernel must be")]:
        try:
            w4a16.partials(*args)
        except ValueError as e:
            assert msg in str(e), (msg, str(e))
        else:
            raise AssertionError(f"accepted: {msg}")
    assert w4a16.choose(torch.randn(9, 256), words, rows, 64) == "gemm"
    assert w4a16.choose(torch.randn(2, 256), words, rows, 64) == "gemv"  # nothing to time under the interpreter
    # the dense Triton GEMV (effllm_utils.gemv) against F.linear: bf16/fp16/fp32, ragged N and K, K split in 8
    from effllm_utils.engine import gemv
    import torch.nn.functional as F
    assert gemv.splits(16, 8192) == 8
    for M, N, K, dt in [(1, 44, 200, torch.bfloat16), (3, 40, 384, torch.float16), (2, 16, 8192, torch.float32)]:
        w, x, b = torch.randn(N, K).to(dt), torch.randn(M, K).to(dt), torch.randn(N).to(dt)
        y = gemv.linear(x, w, b)
        ref = F.linear(x.float(), w.float(), b.float())
        assert y.shape == (M, N) and y.dtype == dt and err(y, ref) < 5e-3, (M, N, K, dt, err(y, ref))
    m32 = EffLLMForCausalLM(models.config("test", attention="gqa")).eval()
    ids32 = torch.randint(0, 128, (1, 6))
    steps = {}
    for kernel in ("triton", "cublas"):
        dec = decode.StaticDecoder(m32, batch_size=1, max_len=16, dense_kernel=kernel)
        assert dec.layers[0]["qkv"].kernel == kernel
        with torch.no_grad():
            dec.prefill(ids32)
            steps[kernel] = torch.stack([dec.step(ids32[:, i:i + 1], 6 + i) for i in range(3)], 1)
    torch.testing.assert_close(steps["triton"], steps["cublas"], rtol=1e-4, atol=1e-4)
    # the decode step with the Triton kernels computes what the tinygemm one does
    # (2 x 4 prompt tokens: the prefill's 8 rows take the gemv, as the interpreter's numpy has no bf16 gemm)
    m = EffLLMForCausalLM(models.config("test", attention="gqa")).to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 4))
    outs = {}
    for kernel in ("triton", "tinygemm"):
        dec = decode.StaticDecoder(m, batch_size=2, max_len=16, weights="int4", group_size=32, int4_kernel=kernel)
        assert dec.layers[0]["qkv"].kernel == kernel
        with torch.no_grad():
            first = dec.prefill(ids)
            outs[kernel] = torch.stack([first.float()] + [dec.step(ids[:, i:i + 1], 4 + i).float()
                                                          for i in range(4)], 1)
        outs[kernel + "_bytes"] = dec.read_bytes
    e = err(outs["triton"], outs["tinygemm"])
    assert e < 2e-2, e
    assert outs["triton_bytes"] == outs["tinygemm_bytes"], outs
    print("ok", e)
""")


def test_kernels_and_decoder_under_the_triton_interpreter():
    pytest.importorskip("triton", minversion="3.9")  # 3.6's interpreter fails on these kernels (measured)
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr[-3000:]


_COMPILED = textwrap.dedent("""
    import torch
    from effllm_utils import models
    from effllm_utils.engine import decode
    from effllm_utils.models import EffLLMForCausalLM
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 6))
    # two widths through the same compiled step: the second compile sees symbolic weight sizes, which the custom ops'
    # fakes must take (a kernel choice keyed on them once failed on the GPU); compiled = eager, token for token
    for width in (64, 96):
        m = EffLLMForCausalLM(models.config("test", attention="gqa", intermediate_size=width)).to(torch.bfloat16)
        for kw in (dict(dense_kernel="triton"), dict(weights="int4", group_size=32, int4_kernel="triton")):
            eager = decode.StaticDecoder(m.eval(), 1, 24, **kw).generate(ids, 4)[0]
            compiled = decode.StaticDecoder(m, 1, 24, compile=True, **kw).generate(ids, 4)[0]
            assert torch.equal(compiled, eager), (width, kw, compiled, eager)
    print("ok")
""")


def test_compiled_decode_with_the_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton", minversion="3.9")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _COMPILED], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available() or not w4a16.available("cuda"), reason="needs CUDA and Triton")
def test_kernels_on_cuda_bf16():
    torch.manual_seed(0)
    for M in (1, 2, 8, 16, 64):
        for N, K in ((1152, 896), (896, 4864), (9728, 896)):
            q, sz = decode.quantize_int4(torch.randn(N, K, device="cuda"), 128)
            words, rows = w4a16.pack(q, sz)
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ decode.dequantize_int4(q, sz, 128).t()
            y = w4a16.matmul(x, words, rows, 128)
            assert ((y.float() - ref).norm() / ref.norm()).item() < 8e-3, (M, N, K)
            assert w4a16.choose(x, words, rows, 128) == ("gemm" if M > 1 else w4a16._CHOICE[(N, K, 128)])
            if M <= w4a16.GEMV_MAX_M:  # both few-row kernels, whichever was chosen
                for kernel in w4a16.KERNELS:
                    out = w4a16.partials(x, words, rows, 128, kernel)
                    assert out.shape == (w4a16.splits(kernel, N, K, 128), M, N)
                    assert ((out.sum(0) - ref).norm() / ref.norm()).item() < 8e-3, (kernel, M, N, K)
    from effllm_utils.engine import gemv
    for M, N, K, dt in ((1, 1152, 896, torch.bfloat16), (1, 896, 4864, torch.bfloat16), (4, 9728, 896, torch.bfloat16),
                        (1, 151936, 896, torch.bfloat16), (2, 896, 4864, torch.float32), (1, 1152, 896, torch.float16)):
        w = torch.randn(N, K, device="cuda", dtype=dt)
        x = torch.randn(M, K, device="cuda", dtype=dt)
        ref = x.double() @ w.double().t()
        err = ((gemv.linear(x, w).double() - ref).norm() / ref.norm()).item()
        assert err < (1e-5 if dt == torch.float32 else 8e-3), (M, N, K, dt, err)
    m = EffLLMForCausalLM(models.config("test", attention="gqa")).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 128, (1, 6), device="cuda")
    auto = decode.StaticDecoder(m, 1, 24, compile=True)  # bf16 on CUDA: the Triton GEMV by default
    assert auto.layers[0]["qkv"].kernel == auto.lm_head.kernel == "triton"
    dense = {k: decode.StaticDecoder(m, 1, 24, compile=True, dense_kernel=k).generate(ids, 8)[0]
             for k in ("cublas", "triton")}
    assert (dense["triton"] == dense["cublas"]).float().mean() >= 0.75
    toks = {k: decode.StaticDecoder(m, 1, 24, compile=True, weights="int4", group_size=32, int4_kernel=k)
            .generate(ids, 8)[0] for k in ("triton", "tinygemm")}
    assert (toks["triton"] == toks["tinygemm"]).float().mean() >= 0.75  # same quantized model, two kernels
    # a second shape through the same compiled code: dynamo recompiles with symbolic weight sizes, which the op's
    # fake must take (the choice of kernel once hashed them and failed, in the decode bench's second model)
    wide = EffLLMForCausalLM(models.config("test", attention="gqa", intermediate_size=96)).to("cuda", torch.bfloat16)
    for k in ("triton", "tinygemm"):
        decode.StaticDecoder(wide.eval(), 1, 24, compile=True, weights="int4", group_size=32, int4_kernel=k
                             ).generate(ids, 4)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("gemlite") is None,
                    reason="needs CUDA and gemlite")
def test_gemlite_int4_on_cuda():
    """GemLite's layer built from our ints computes the dequantized weight's product to 1% (1-64 rows, 0.5B shapes,
    the 1.5B down projection, one group per row too); the compiled decode step through it matches the tinygemm one."""
    torch.manual_seed(0)
    for N, K, g in ((1152, 896, 128), (896, 4864, 128), (1536, 8960, 128), (256, 128, 128)):
        q, sz = decode.quantize_int4(torch.randn(N, K, device="cuda"), g)
        args = decode.gemlite_args(q, sz, g)
        ref_w = decode.dequantize_int4(q, sz, g)
        for M in (1, 2, 8, 64):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            y = torch.ops.gemlite.forward_functional(x, None, *args)
            ref = x.float() @ ref_w.t()
            assert y.shape == (M, N) and y.dtype == torch.float32  # fp32 out: see decode.gemlite_args
            # GemLite dequantizes in bf16 (w = fma(q, s, z')): 0.56% measured at 2 rows of the first shape on an H100
            assert ((y - ref).norm() / ref.norm()).item() < 1e-2, (M, N, K)
    m = EffLLMForCausalLM(models.config("test", attention="gqa")).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 128, (1, 6), device="cuda")
    toks = {k: decode.StaticDecoder(m, 1, 24, compile=True, weights="int4", group_size=32, int4_kernel=k)
            .generate(ids, 8)[0] for k in ("gemlite", "tinygemm")}
    assert (toks["gemlite"] == toks["tinygemm"]).float().mean() >= 0.75
