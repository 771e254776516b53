"""A fast decode path: a static KV cache and a fixed-shape one-token step, compiled and captured in a CUDA graph,
with bf16/fp16 weights or int4 weights (torch's tinygemm kernel, or effllm's Triton W4A16 kernels).

HF `generate` in eager mode spends almost all of a small model's decode time launching kernels from Python (an H100
decodes a Qwen2.5-1.5B shape at ~2% of the memory-bandwidth roofline that way). Here:

- the KV cache is preallocated ([layers] x [B, kv_heads, max_len, head_dim]); the step writes the new K/V at the
  current position with `index_copy_` and attends over the whole buffer under a position mask, so every tensor has a
  fixed shape and address and the step can be `torch.compile`d and replayed as one CUDA graph per token;
- each layer's q/k/v and gate/up projections are read as ONE weight each: fewer, larger matrix-vector products,
  which is what decides a memory-bound step's speed (a dense model's own q/k/v and gate/up weights become views of
  the fused ones, so model and decoder hold one copy); the prompt runs through the same weights and kernels in one
  pass (prefill), so an int8/int4 decoder holds no float copy of its projections;
- the greedy choice, the next position and the token history are updated inside the step, so decoding a token is
  one graph replay with no host round trip; per-token timestamps come from CUDA events recorded after each replay
  (on CPU, from the host clock after each step), not from dividing a total;
- `weights="int4"`: every linear layer (lm_head included) is quantized round-to-nearest, groupwise asymmetric
  (group 128 by default) — or a GPTQ checkpoint's ints are taken as they are — and multiplied by
  `torch.ops.aten._weight_int4pack_mm` (tinygemm on CUDA, its CPU twin on CPU), or with `int4_kernel="triton"` by
  effllm's Triton W4A16 kernels (`w4a16`; all three versions measured slower than tinygemm). Activations are bf16.
  Quality is measured by the quantization study, not assumed;
- dense (float) layers on CUDA go through effllm's Triton GEMV (`gemv`, `dense_kernel="auto"`), which splits K
  over the GPU and leaves the partial sums to the compiled consumer: in bf16 1.12x (1.5B shape) and 1.16x (0.5B)
  the cuBLAS step's tokens/s, measured on an H100.

    dec = StaticDecoder(model, batch_size=1, max_len=512, cuda_graph=True, compile=True)
    tokens, stamps = dec.generate(prompt_ids, new_tokens=128)
    dec.read_bytes          # bytes the step reads per token (the roofline numerator)

Works for the effllm backbone with mha/gqa/mqa + rope + dense FFN, and for `transformers` Qwen2-family checkpoints
(Qwen2.5, DeepSeek-R1-Distill-Qwen) and Llama-family ones (SmolLM2) through `from_hf`, which loads them
weight-for-weight into the backbone. `weights="int8"` (CPU): per-channel int8 through `aten._weight_int8pack_mm`.
On CPU the same step runs without graphs (and is what the tests compare against `generate`).

Long by design: the static decoder and its int4 weight paths are one unit (the kernels share the cache and weight
layout).
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from effllm_utils.core.runtime import synchronize

INT4_GROUP = 128
KEEP_INT4_REFERENCE = False  # tests: each int4 Linear keeps its integers (`.q`) beside the packed layout


HF_FAMILIES = ("qwen2", "llama")  # transformers model types the backbone holds weight for weight


def from_hf(hf_model):
    """A transformers Qwen2ForCausalLM or LlamaForCausalLM (Qwen2.5, DeepSeek-R1-Distill-Qwen, SmolLM2, ...) as an
    effllm backbone with the same weights (Qwen2's q/k/v biases kept; Llama's `attention_bias` followed)."""
    from effllm_utils import models

    c = hf_model.config
    if c.model_type not in HF_FAMILIES:
        raise ValueError(f"the static decoder runs the effllm backbone and {'/'.join(HF_FAMILIES)} checkpoints, not "
                         f"{c.model_type}")
    if getattr(c, "mlp_bias", False):
        raise ValueError("a Llama checkpoint with MLP biases does not map onto the backbone")
    rope = (getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope != "default" or getattr(c, "use_sliding_window", False):
        raise ValueError(f"the static decoder implements plain RoPE over the full context, not rope_type {rope!r}"
                         f"{' with a sliding window' if getattr(c, 'use_sliding_window', False) else ''}")
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    cfg = models.EffLLMConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=theta, attention="gqa", position="rope", ffn="dense",
        qkv_bias=c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
        tie_word_embeddings=c.tie_word_embeddings)
    from transformers.initialization import no_init_weights

    # built without initialising its weights (every one is assigned from the checkpoint below; the random init of a
    # 135M model took ~2 s of each precision's decoder build)
    with torch.device(next(hf_model.parameters()).device), no_init_weights():
        ours = models.EffLLMForCausalLM(cfg).to(hf_model.dtype)
    # assign: the backbone takes the checkpoint's tensors themselves (no second copy of the weights)
    missing, unexpected = ours.load_state_dict(hf_model.state_dict(), strict=False, assign=True)
    if unexpected or [k for k in missing if k != "lm_head.weight" or not c.tie_word_embeddings]:
        raise ValueError(f"{type(hf_model).__name__} does not map onto the backbone: missing {missing}, "
                         f"unexpected {unexpected}")
    if c.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    return ours.eval()


# -- int4 weights (tinygemm layout) ------------------------------------------------------------------------------

def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest groupwise asymmetric int4 of a [out, in] weight, in tinygemm's convention:
    w ~ (q - 8) * scale + zero, q in 0..15, per group of `group` input columns.
    Returns q (int32 [out, in]) and scales_and_zeros (bf16 [in / group, out, 2])."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 needs in_features divisible by the group size {group}, got {k}")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-6) / 15
    q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    sz = torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [k/g, n, 2]
    return q, sz


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """The float weight [out, in] that an int4 (q, scales_and_zeros) pair stands for (the reference)."""
    n, k = q.shape
    scale, zero = sz.float().transpose(0, 1).unbind(-1)  # [n, k/g] each
    return ((q.float().reshape(n, k // group, group) - 8) * scale[..., None] + zero[..., None]).reshape(n, k)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of a [out, in] weight: (q int8 [out, in], scales [out] in w's dtype), w ~ q *
    scale (torchao's int8 weight-only scheme, in the layout of torch's `_weight_int8pack_mm`)."""
    scale = w.float().abs().amax(1).clamp(min=1e-8) / 127
    q = (w.float() / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q.contiguous(), scale.to(w.dtype)


INT4_KERNELS = ("tinygemm", "triton", "gemlite")
DENSE_KERNELS = ("auto", "cublas", "triton")


def _sm80(device: torch.device | str) -> bool:
    """A CUDA device of compute capability >= 8.0 (what effllm's Triton GEMV by default and GemLite need)."""
    return torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def int4_kernel(kernel: str, device: torch.device | str) -> str:
    """Checks the int4 matmul a decode step on `device` is to use: "tinygemm" (torch's `_weight_int4pack_mm`, the
    default: faster than effllm's Triton kernels, measured), "triton" (effllm's W4A16 kernels, `w4a16`: CUDA, or
    Triton's interpreter on CPU) or "gemlite" (GemLite's A16W4 Triton kernels, `pip install gemlite`: CUDA only)."""
    import importlib.util

    from effllm_utils.engine.gemv import available

    if kernel not in INT4_KERNELS:
        raise ValueError(f"int4 kernel must be one of {INT4_KERNELS}, not {kernel!r}")
    have_gemlite = kernel == "gemlite" and importlib.util.find_spec("gemlite") is not None
    if kernel == "gemlite" and not (have_gemlite and _sm80(device)):
        where = torch.device(device).type
        if where == "cuda":
            where = "compute capability {}.{}".format(*torch.cuda.get_device_capability(device))
        raise ValueError(f"GemLite's int4 kernels need a CUDA GPU of compute capability >= 8.0 and the gemlite "
                         f"package (pip install -e '.[gpu]'); here: {where}, gemlite "
                         f"{'installed' if have_gemlite else 'missing'}; use int4_kernel='tinygemm'")
    if kernel == "triton" and not available(device):
        raise ValueError(f"the Triton W4A16 kernel cannot run on {torch.device(device).type} here (it needs Triton "
                         f"and a CUDA device, or TRITON_INTERPRET=1 on CPU); use int4_kernel='tinygemm'")
    return kernel


class Linear:
    """One linear layer as the decode step reads it: a dense weight (cuBLAS, or effllm's Triton GEMV:
    `dense_kernel`), or int4 for tinygemm, the Triton W4A16 kernels or GemLite (`kernel`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, int4: bool, group: int = INT4_GROUP,
                 quantized: tuple[torch.Tensor, torch.Tensor] | None = None, kernel: str = "tinygemm",
                 dense_kernel: str = "auto", int8: bool = False):
        """quantized: (q, scales_and_zeros) already made (e.g. a GPTQ checkpoint's, `read_gptq`); else RTN.
        dense_kernel: "cublas" (F.linear), "triton" (effllm's GEMV at batch 1, `gemv`) or "auto": the Triton GEMV
        on a CUDA GPU of compute capability >= 8.0 where Triton is installed (measured in bf16 1.12-1.16x the cuBLAS
        step, H100, Qwen2.5 0.5B/1.5B shapes, batch 1; fp32 and fp16 take it too, so a precision comparison runs one
        kernel family), cuBLAS otherwise."""
        from effllm_utils.engine.gemv import available

        self.out_features, self.in_features = weight.shape
        self.bias, self.int4, self.int8, self.group = bias, int4, int8 and not int4, group
        self.cuda = weight.device.type == "cuda"
        if self.int8:  # per-output-channel symmetric int8, activations in the weight's dtype (torch's CPU kernel)
            if self.cuda:
                raise ValueError("int8 decode weights run on CPU (torch's _weight_int8pack_mm); on CUDA use int4")
            q8, scales = quantized if quantized is not None else quantize_int8(weight.detach())
            self.weight, self.scales = q8.to(weight.device), scales.to(weight.device, weight.dtype)
            self.kernel = "int8pack"
            self.read_bytes = self.weight.numel() + self.scales.numel() * self.scales.element_size()
        elif not int4:
            if dense_kernel not in DENSE_KERNELS:
                raise ValueError(f"dense kernel must be one of {DENSE_KERNELS}, not {dense_kernel!r}")
            if dense_kernel == "auto":  # Ampere or newer (measured on Hopper; Triton's bf16 needs sm_80)
                dense_kernel = "triton" if _sm80(weight.device) and available(weight.device) else "cublas"
            if dense_kernel == "triton" and not available(weight.device):
                raise ValueError(f"the Triton GEMV cannot run on {weight.device.type} here (it needs Triton and a "
                                 f"CUDA device, or TRITON_INTERPRET=1 on CPU); use dense_kernel='cublas'")
            self.kernel = dense_kernel
            self.weight = weight.detach()
            self.read_bytes = self.weight.numel() * self.weight.element_size()
        else:
            self.kernel = int4_kernel(kernel, weight.device)
            q, sz = quantized if quantized is not None else quantize_int4(weight.detach(), group)
            q, sz = q.to(weight.device), sz.to(weight.device)
            if self.kernel == "gemlite":
                self.gemlite = gemlite_args(q, sz, group)
                stored = self.gemlite[0][:3]
            elif self.kernel == "triton":
                from effllm_utils.engine.w4a16 import choose, pack

                self.weight, self.sz_rows = pack(q, sz)
                stored = (self.weight, self.sz_rows)
                # the few-row kernel is timed now, eagerly: a compiled step cannot time it and must not guard on it
                one_row = torch.randn(1, self.in_features, device=weight.device, dtype=weight.dtype)
                self.few_rows = choose(one_row, self.weight, self.sz_rows, group)
            else:
                if self.out_features % 8:
                    raise ValueError(f"tinygemm int4 needs out_features divisible by 8, got {self.out_features}")
                tiles = 8 if self.in_features % 128 == 0 else 4 if self.in_features % 64 == 0 else 2
                if self.cuda:  # CUDA's packer takes two 4-bit values per byte
                    self.weight = torch.ops.aten._convert_weight_to_int4pack(
                        (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
                else:
                    self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, tiles)
                stored = (self.weight, sz)
            self.sz = sz
            self.read_bytes = sum(t.numel() * t.element_size() for t in stored)
            self._check(q)  # a packed layout can drift between torch versions: verify it computes what (q, sz) mean
            if self.cuda:  # sz only where tinygemm reads it
                self.sz = sz if self.kernel == "tinygemm" else None
            # q only when asked (the tests' reference): kept, it took more memory than the bf16 weight it replaces
            self.q = q.to(torch.uint8) if KEEP_INT4_REFERENCE else None
        if bias is not None:
            self.read_bytes += bias.numel() * bias.element_size()

    def _check(self, q: torch.Tensor) -> None:
        w = dequantize_int4(q, self.sz, self.group)
        for rows in (1, 3):  # the kernels a batch-1 and a batched step take
            x = torch.randn(rows, self.in_features, device=q.device, dtype=torch.bfloat16)
            ref = x.float() @ w.t()
            got = self(x).float() - (0 if self.bias is None else self.bias.float())
            err = ((got - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                raise RuntimeError(f"int4 kernel check failed ({self.kernel}, {rows} row(s): relative error {err:.3g} "
                                   f"vs the dequantized weight) with torch {torch.__version__}; use weights='native'")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.int8:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).reshape(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        if not self.int4:
            if self.kernel == "triton":
                from effllm_utils.engine import gemv  # Triton is imported only where a Triton kernel was asked for

                if flat.shape[0] <= gemv.DECODE_M:
                    return gemv.linear(flat, self.weight, self.bias).reshape(*x.shape[:-1], self.out_features)
            return F.linear(x, self.weight, self.bias)
        if self.kernel == "gemlite":
            y = torch.ops.gemlite.forward_functional(flat, None, *self.gemlite).to(flat.dtype)
        elif self.kernel == "triton":
            from effllm_utils.engine.w4a16 import matmul

            y = matmul(flat, self.weight, self.sz_rows, self.group, self.few_rows)
        elif self.cuda:
            y = torch.ops.aten._weight_int4pack_mm(flat, self.weight, self.group, self.sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group, self.sz)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def gemlite_args(q: torch.Tensor, sz: torch.Tensor, group: int) -> tuple[list[torch.Tensor], list[int]]:
    """GemLite's A16W4 layer (bf16 in, fp32 out) holding the same ints as (q, scales_and_zeros), as the (tensor, meta)
    arguments of its `gemlite::forward_functional` op. GemLite's asymmetric form is w = q s + z' (its fma mode); ours
    is w = (q - 8) s + z, so z' = z - 8 s, formed in fp32 and then stored in bf16 as tinygemm stores z. The output is
    fp32 (the caller casts it): GemLite's split-K GEMVs add their partial sums with atomics in the output dtype, and
    with bf16 atomics the product was 1-2% (relative) off the dequantized weight's on the H100, with fp32 output 0.56%
    (measured, 2 rows of a 1152x896 layer)."""
    import gemlite

    n, k = q.shape
    scale, zero = sz.float().transpose(0, 1).unbind(-1)  # [n, k/group]
    lin = gemlite.GemLiteLinearTriton(W_nbits=4, group_size=group, in_features=k, out_features=n,
                                      input_dtype=gemlite.DType.BF16, output_dtype=gemlite.DType.FP32)
    lin.pack(q.to(torch.uint8), scale.to(torch.bfloat16), 8 - zero / scale)  # pack forms -(8 - z/s) s in fp32
    lin.zeros = torch.nn.Parameter(lin.zeros.detach().to(torch.bfloat16), requires_grad=False)
    return lin.get_tensor_args(), lin.get_meta_args()


def _fused(*mods) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.cat([m.weight.detach() for m in mods])
    b = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
    return w, b


def _share(lin: "Linear", *mods) -> None:
    """Point the modules' weights (and biases) at slices of the fused dense `lin`: the model and its decoder then
    hold one copy of them, with the same values."""
    start = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(lin.weight[start:start + n], requires_grad=False)
        if m.bias is not None:
            m.bias = torch.nn.Parameter(lin.bias[start:start + n], requires_grad=False)
        start += n


PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def release_projections(model) -> None:
    """Free a backbone's per-layer projection weights (left as meta tensors) once a `DecodeWeights` of it holds its
    own integer weights: the decoder reads only those, the embeddings, the norms and lm_head. The backbone's own
    forward cannot run afterwards."""
    for layer in model.model.layers:
        for name in PROJECTIONS:
            mod = layer.get_submodule(name)
            mod.weight = torch.nn.Parameter(mod.weight.to("meta"), requires_grad=False)


def _unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words holding 8 int4 values (lowest nibble first) -> int32 values, unpacked along `dim`."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    if dim == 0:  # [k/8, n] -> [k, n]
        return ((packed[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, packed.shape[1])
    return ((packed[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(packed.shape[0], -1)  # [g, n/8] -> [g, n]


def read_gptq(path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """A GPTQ checkpoint (GPTQModel / AutoGPTQ / transformers' GPTQConfig: 4-bit, `gptq` v1 or `gptq_v2` format,
    no act-order) read straight from its safetensors, without GPTQ kernels: (the float tensors, {module: (q [out, in]
    int32 0..15, tinygemm scales_and_zeros [in/g, out, 2] bf16)}, group size). GPTQ's w = (q - z) s is tinygemm's
    (q - 8) s + zero with zero = (8 - z) s, exactly."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    qc = json.loads((path / "quantize_config.json").read_text()) if (path / "quantize_config.json").is_file() \
        else json.loads((path / "config.json").read_text()).get("quantization_config", {})
    if qc.get("bits") != 4 or qc.get("desc_act"):
        raise ValueError(f"{path}: only 4-bit GPTQ without act-order maps onto tinygemm (bits {qc.get('bits')}, "
                         f"desc_act {qc.get('desc_act')})")
    v1 = qc.get("checkpoint_format", qc.get("format", "gptq")) == "gptq"  # v1 stores zero - 1
    group = int(qc["group_size"])
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    floats, quant = {}, {}
    for name in [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]:
        qw, qz, sc = tensors.pop(name + ".qweight"), tensors.pop(name + ".qzeros"), tensors.pop(name + ".scales")
        g_idx = tensors.pop(name + ".g_idx", None)
        q = _unpack_int4(qw, 0)  # [k, n]
        k = q.shape[0]
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // group):
            raise ValueError(f"{name}: permuted groups (act-order) do not map onto tinygemm")
        z = _unpack_int4(qz, 1)[:, : q.shape[1]].float() + (1 if v1 else 0)  # [k/g, n]
        s = sc.float()
        sz = torch.stack([s, (8 - z) * s], -1).to(torch.bfloat16)  # [k/g, n, 2]
        quant[name] = (q.t().contiguous(), sz)
        if name + ".bias" in tensors:
            floats[name + ".bias"] = tensors.pop(name + ".bias")
    floats.update(tensors)
    return floats, quant, group


def from_gptq(path, device: str = "cpu") -> tuple[object, dict]:
    """(backbone, int4_weights) of a Qwen2- or Llama-family GPTQ checkpoint: the backbone in bf16 holds the dequantized
    weights (its forward computes the quantized model's function: a reference) and `int4_weights` the ints for
    `StaticDecoder(model, ..., int4_weights=...)` / `DecodeWeights`, whose prefill and steps read only the ints
    (`infer.FastDecode.from_gptq` then frees the dequantized copies: `release_projections`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    floats, quant, group = read_gptq(path)
    cfg = AutoConfig.from_pretrained(path)
    cfg.quantization_config = None
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(cfg)
    state = dict(floats)
    for name, (q, sz) in quant.items():
        state[name + ".weight"] = dequantize_int4(q, sz, group).to(torch.bfloat16)
    shell = shell.to_empty(device="cpu").to(torch.bfloat16)
    missing, unexpected = shell.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: not a {'/'.join(HF_FAMILIES)} GPTQ checkpoint (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]})")
    if cfg.tie_word_embeddings:
        shell.tie_weights()
    ours = from_hf(shell.eval()).to(device)
    return ours, quant


def from_int8(model, device: str = "cpu") -> tuple[object, dict]:
    """(backbone, int8_weights) of a Qwen2- or Llama-family model quantized by torchao's int8 weight-only
    (`Int8Tensor` weights, per output channel, symmetric): the backbone in bf16 holds the dequantized weights (its
    forward computes the quantized model's function; `FastDecode.from_int8` frees them) and `int8_weights`
    {module: (int8 [out, in], scale [out])}, the
    same integers, for `DecodeWeights(..., int8_weights=...)` (torch's `_weight_int8pack_mm`)."""
    from transformers import AutoModelForCausalLM

    ints, floats = {}, {}
    for name, t in model.state_dict().items():
        if type(t).__name__ == "Int8Tensor":
            flat, _ = t.__tensor_flatten__()
            qdata, scale = t.qdata, t.scale.reshape(-1).float()
            zero = getattr(t, "zero_point", None) if "zero_point" in flat else None
            if qdata.ndim != 2 or scale.numel() != qdata.shape[0] or (zero is not None and bool(zero.any())):
                raise ValueError(f"{name}: only per-channel symmetric int8 maps onto the int8 decode kernel")
            ints[name.removesuffix(".weight")] = (qdata.contiguous(), scale)
            floats[name] = (qdata.float() * scale[:, None]).to(torch.bfloat16)
        else:
            floats[name] = t.detach().to(torch.bfloat16) if t.is_floating_point() else t
    if not ints:
        raise ValueError("no torchao int8 weight-only layers in this model")
    cfg = copy.deepcopy(model.config)
    cfg.quantization_config = None
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(cfg)
    shell = shell.to_empty(device="cpu").to(torch.bfloat16)
    missing, unexpected = shell.load_state_dict(floats, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:  # to_empty left those uninitialised: refuse rather than decode garbage
        raise ValueError(f"not a {'/'.join(HF_FAMILIES)} int8 model (missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]})")
    if cfg.tie_word_embeddings:
        shell.tie_weights()
    return from_hf(shell.eval()).to(device), ints


# -- the decoder -------------------------------------------------------------------------------------------------

class DecodeWeights:
    """The weights a decode step reads, laid out once per model and shared by the decoders of every batch size:
    per layer the norms, one fused q/k/v and one fused gate/up weight, o and down; lm_head. Dense (the model's
    q/k/v and gate/up weights are then re-pointed at slices of the fused ones: one copy in memory) in the
    model's dtype, or int4 for tinygemm — RTN-quantized here, or a GPTQ checkpoint's own ints (`int4_weights`,
    {module name: (q, scales_and_zeros)} from `from_gptq`; their group size follows from the shapes, and a GPTQ
    checkpoint's float lm_head stays float). Refuses, with the reason, a model the static step cannot run."""

    def __init__(self, model, weights: str = "native", group_size: int = INT4_GROUP, int4_weights: dict | None = None,
                 int4_kernel: str = "tinygemm", dense_kernel: str = "auto", int8_weights: dict | None = None):
        c = model.config
        if int8_weights and int4_weights:
            raise ValueError("give int4_weights or int8_weights, not both")
        if int8_weights:
            weights = "int8"
        if c.attention not in ("mha", "gqa", "mqa") or c.position != "rope" or c.ffn != "dense":
            raise ValueError(f"StaticDecoder supports mha/gqa/mqa + rope + dense, not {c.attention}/{c.position}/"
                             f"{c.ffn}")
        if int4_weights:
            q0, sz0 = next(iter(int4_weights.values()))
            weights, group_size = "int4", q0.shape[1] // sz0.shape[0]
        if weights not in ("native", "int8", "int4"):
            raise ValueError(f"weights must be 'native' (the model's dtype), 'int8' or 'int4', not {weights!r}")
        p = next(model.parameters())
        if weights == "int4" and p.dtype != torch.bfloat16:
            raise ValueError(f"int4 decoding runs with bf16 activations; load the model in bf16, not "
                             f"{str(p.dtype).removeprefix('torch.')}")
        self.int4 = int4 = weights == "int4"
        self.split = [c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim,
                      c.num_key_value_heads * c.head_dim]
        self.int8 = weights == "int8"
        given = int8_weights or int4_weights or {}
        k = dict(kernel=int4_kernel, dense_kernel=dense_kernel, int8=self.int8)

        def q(*names):  # the given int weights of these modules, fused along the output features, or None (RTN)
            if not all(n in given for n in names):
                return None  # int4 scales_and_zeros are [in/g, out, 2], int8 scales [out]
            return (torch.cat([given[n][0] for n in names]),
                    torch.cat([given[n][1] for n in names], dim=0 if self.int8 else 1))

        with torch.no_grad():
            self.layers = []
            for i, layer in enumerate(model.model.layers):
                a, f = layer.self_attn, layer.mlp
                pa, pm = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
                self.layers.append(dict(
                    ln1=layer.input_layernorm, ln2=layer.post_attention_layernorm,
                    qkv=Linear(*_fused(a.q_proj, a.k_proj, a.v_proj), int4, group_size,
                               q(pa + "q_proj", pa + "k_proj", pa + "v_proj"), **k),
                    o=Linear(a.o_proj.weight, a.o_proj.bias, int4, group_size, q(pa + "o_proj"), **k),
                    gate_up=Linear(*_fused(f.gate_proj, f.up_proj), int4, group_size,
                                   q(pm + "gate_proj", pm + "up_proj"), **k),
                    down=Linear(f.down_proj.weight, None, int4, group_size, q(pm + "down_proj"), **k)))
            if not (int4 or self.int8):  # the model's q/k/v and gate/up become views of the fused weights
                for layer, d in zip(model.model.layers, self.layers):
                    _share(d["qkv"], layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
                    _share(d["gate_up"], layer.mlp.gate_proj, layer.mlp.up_proj)
            quantized_head = not given or "lm_head" in given  # a GPTQ / torchao checkpoint may keep a float head
            self.lm_head = Linear(model.lm_head.weight, None, int4 and quantized_head, group_size, q("lm_head"),
                                  **(k | {"int8": self.int8 and quantized_head}))
        self.int4_kernel = int4_kernel if int4 else None
        self.dense_kernel = None if self.lm_head.int4 or self.int8 else self.lm_head.kernel  # "auto" resolved
        norms = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if "norm" in n)
        # per token: every weight once, one embedding row, the norms (the KV cache read is small at these lengths)
        self.read_bytes = (sum(lin.read_bytes for d in self.layers for k, lin in d.items() if k not in ("ln1", "ln2"))
                           + self.lm_head.read_bytes + c.hidden_size * p.element_size() + norms)


class StaticDecoder:
    """Greedy decoding with a preallocated KV cache and a fixed-shape step (see the module docstring)."""

    def __init__(self, model, batch_size: int, max_len: int, cuda_graph: bool = True, compile: bool | str = False,
                 weights: str = "native", group_size: int = INT4_GROUP, int4_weights: dict | None = None,
                 prepared: DecodeWeights | None = None, int4_kernel: str = "tinygemm", dense_kernel: str = "auto"):
        """weights/group_size/int4_weights/int4_kernel/dense_kernel: see DecodeWeights, `int4_kernel` and `Linear`;
        prepared: a DecodeWeights of this model to share (decoders of several batch sizes then hold one copy of the
        weights)."""
        w = prepared or DecodeWeights(model, weights, group_size, int4_weights, int4_kernel, dense_kernel)
        c = model.config
        self.model, self.c = model.eval(), c
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.B, self.max_len = batch_size, max_len
        self.gqa = bool(c.num_key_value_heads != c.num_attention_heads)  # a plain bool: dynamo must not trace it
        self.layers, self.lm_head, self.split, self.read_bytes = w.layers, w.lm_head, w.split, w.read_bytes
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(c.num_hidden_layers)]
        self.inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=self.device,
                                                             dtype=torch.float32) / c.head_dim))
        self.slots = torch.arange(max_len, device=self.device)
        self.tok = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # static step inputs
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)
        self.history = torch.zeros(batch_size, max_len, dtype=torch.long, device=self.device)
        self.use_graph = cuda_graph and self.device.type == "cuda"
        if compile:  # True: inductor's default mode; a string: its mode (e.g. "max-autotune-no-cudagraphs")
            mode = compile if isinstance(compile, str) else None
            self._advance_fn = torch.compile(self._advance, fullgraph=True, mode=mode)
        else:
            self._advance_fn = self._advance
        self.graph = None

    def _forward(self, tok: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of the last of T tokens per sequence ([B, T] at `positions` [T]); writes their K/V into
        the cache. T = 1 is the decode step; the prompt runs through it too (prefill), with the same weights and
        kernels, so a quantized decoder needs no float copy of its weights."""
        c, B, T = self.c, self.B, tok.shape[1]
        freqs = positions[:, None].float() * self.inv_freq  # [T, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        mask = (self.slots[None, :] <= positions[:, None])[None, None]  # causal over the cache: [1, 1, T, max_len]
        x = self.model.model.embed_tokens(tok)
        for i, L in enumerate(self.layers):
            q, k, v = L["qkv"](L["ln1"](x)).split(self.split, dim=-1)
            q = q.view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)
            k = k.view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
            v = v.view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i].index_copy_(2, positions, k)
            self.v[i].index_copy_(2, positions, v)
            o = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask, enable_gqa=self.gqa)
            x = x + L["o"](o.transpose(1, 2).reshape(B, T, -1))
            gate, up = L["gate_up"](L["ln2"](x)).chunk(2, dim=-1)
            x = x + L["down"](F.silu(gate) * up)
        return self.lm_head(self.model.model.norm(x[:, -1:]))[:, -1]

    def _forward_one(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] for one token per sequence at position `pos` (a 0-d tensor)."""
        return self._forward(tok, pos.view(1))

    def _advance(self) -> None:
        """One greedy step on the static buffers: feed tok at pos, then tok <- argmax, pos += 1, record it."""
        nxt = greedy(self._forward_one(self.tok, self.pos))
        self.pos.add_(1)
        self.tok.copy_(nxt)
        self.history.index_copy_(1, self.pos.view(1), nxt)

    @torch.no_grad()
    def step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [B, vocab] of one token per sequence at `pos` (eager; writes the cache). For tests and probing."""
        return self._forward_one(tok.to(self.device), torch.tensor(pos, device=self.device))

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt through the decoder's own weights in one pass (its K/V into the static cache); returns the
        last position's logits [B, vocab]."""
        if ids.shape[0] != self.B or ids.shape[1] >= self.max_len:
            raise ValueError(f"prompt must be [{self.B}, < {self.max_len}], got {tuple(ids.shape)}")
        return self._forward(ids.to(self.device), self.slots[:ids.shape[1]])

    def _capture(self) -> None:
        saved = [t.clone() for t in (*self.k, *self.v, self.tok, self.pos, self.history)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        # warm-up (and compilation) outside the graph, then the capture; each run starts at position 0 so the
        # writes stay inside the cache whatever the prompt length (a capture at the prompt's end would step past
        # max_len when few tokens are left); the buffers are restored below
        with torch.cuda.stream(s):
            for _ in range(3):
                self.pos.zero_()
                self._advance_fn()
        torch.cuda.current_stream().wait_stream(s)
        self.pos.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._advance_fn()
        for t, v in zip((*self.k, *self.v, self.tok, self.pos, self.history), saved):  # capture ran the step
            t.copy_(v)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[float]]:
        """Greedy tokens [B, new_tokens] and a timestamp (host clock, s) for each one, the first after prefill."""
        L = ids.shape[1]
        if L + new_tokens > self.max_len:
            raise ValueError(f"prompt {L} + {new_tokens} new tokens exceed max_len {self.max_len}")
        ids = ids.to(self.device)
        synchronize(str(self.device))
        nxt = self.prefill(ids).argmax(-1, keepdim=True)
        self.tok.copy_(nxt)
        self.pos.fill_(L)
        self.history[:, L:L + 1] = nxt
        if self.use_graph and self.graph is None:
            self._capture()
        synchronize(str(self.device))
        t0 = time.perf_counter()
        if self.use_graph:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(new_tokens)]
            events[0].record()
            for e in events[1:]:
                self.graph.replay()
                e.record()
            events[-1].synchronize()
            stamps = [t0 + events[0].elapsed_time(e) / 1e3 for e in events]
        else:
            stamps = [t0]
            for _ in range(new_tokens - 1):
                self._advance_fn()
                synchronize(str(self.device))
                stamps.append(time.perf_counter())
        return self.history[:, L:L + new_tokens].clone(), stamps


def greedy(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """`logits.argmax(-1, keepdim=True)` computed in two stages: the max of each `chunk`-wide slice, then the best
    slice. A single argmax over a 152k vocabulary at batch 1 is one thread block's reduction (~32 us/token on an H100,
    measured); split, the first stage spreads over ~150 blocks. Ties resolve to the first index, as argmax."""
    V = logits.shape[-1]
    n = V // chunk
    if n < 2:
        return logits.argmax(-1, keepdim=True)
    vals, idx = logits[..., :n * chunk].unflatten(-1, (n, chunk)).max(-1)  # first max within each slice
    best = vals.argmax(-1, keepdim=True)  # the first slice holding the overall max
    tok = best * chunk + idx.gather(-1, best)
    if n * chunk < V:  # the tail past the last whole slice
        tail_val, tail_idx = logits[..., n * chunk:].max(-1, keepdim=True)
        tok = torch.where(tail_val > vals.gather(-1, best), tail_idx + n * chunk, tok)
    return tok


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def weight_bytes(model) -> int:
    """Bytes read per decoded token by a memory-bound decoder: every parameter once (the roofline numerator)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def roofline_fraction(tokens_per_s_per_sequence: float, model_or_bytes, bandwidth_bytes_per_s: float) -> float:
    """Achieved / memory-bandwidth-bound decode rate at batch 1: tokens/s x bytes read per token / bandwidth.
    `model_or_bytes`: a model (every parameter counted once) or the bytes a decoder reads per token."""
    nbytes = model_or_bytes if isinstance(model_or_bytes, (int, float)) else weight_bytes(model_or_bytes)
    return tokens_per_s_per_sequence * nbytes / bandwidth_bytes_per_s
