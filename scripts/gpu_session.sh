#!/usr/bin/env bash
# The GPU measurements the README quotes, each under its own time limit, its log written as it runs (so a step cut
# short still leaves what it printed). Run from the repository root on a CUDA host:
#
#   scripts/gpu_session.sh [step ...]        (default: tests decode train)
#
# steps:
#   tests     the CUDA-only tests (effllm's Triton kernels, GemLite int4, NSA FlexAttention gradients, CUDA memory telemetry)
#   decode    batch-1 decode, Qwen2.5-1.5B shape: bf16 compiled + CUDA graph (cuBLAS and the Triton GEMV), int4
#             through tinygemm and GemLite (effllm's Triton W4A16, measured slower, is left out: dtrace runs it)
#   decode05  the same at the Qwen2.5-0.5B shape
#   dtrace    the 0.5B decode step's kernels in launch order (Triton GEMV bf16 and the int4 kernels) under the profiler
#   train     training step at the gpu profile's largest shape: dense vs dense with the fused chunked loss
#   tuned     the dense training step at that shape with the fused chunked loss, compiled with
#             max-autotune-no-cudagraphs (GEMM and fused-kernel autotuning; over 280 s of compilation, so run it alone;
#             inductor's autotune cache makes a second call on the same warm host quick) — compare with `train`'s
#             fused-loss row. With the plain loss, autotuning the 2.5 G-element head GEMM crashed (illegal address).
#   trace     the dense training step at that shape under the profiler (kernel table)
#   levers    the two cheap MFU levers not yet measured at that shape: 4 micro-batches per optimizer step (AdamW's
#             ~3.4 ms amortised further; 2 gave 40.3%), and one 32 x 1024 micro-batch with the fused chunked loss
#             (larger GEMMs; the chunked loss keeps the logits out of memory; may not fit: the log says so)
#   hardware  the hardware study on the gpu profile (matmul peak, copy bandwidth, idle power) through papermill
#   study     the attention study on the gpu profile (MHA, MQA, GQA, MLA, NSA at GQA's non-embedding parameters; NSA
#             4 x 64 + 256 of 1024; no LR sweep, no tracker: a short check) through papermill (the embedded corpus and tokenizer, as a
#             GPU host without the Hub has them)
#
# papermill (study) and gemlite (the GemLite int4 kernel in tests/decode) are taken from wheels in .whl/ where the host
# lacks them (a host without internet: build them here with `pip download`/`pip wheel` for its Python, carry .whl/);
# they are installed once, without dependencies, to /tmp/site.
#
# Logs go to $OUT (set by the device tool) or outputs/gpu_session/. PYTHON picks the interpreter (default python3).
set -u
out=${OUT:-outputs/gpu_session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() {  # step NAME SECONDS CMD...: run CMD under a limit, log to $out/NAME.log, show its tail
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name exit $?"
  grep -v -i -e warn -e "Failed to load" "$out/$name.log" | tail -n 30
}

wheels() {  # install .whl/ to /tmp/site once, if papermill or gemlite is missing and wheels are there
  [ -n "${_wheels_done:-}" ] && return
  _wheels_done=1
  if ! "$py" -c "import papermill, importlib.util as u; assert u.find_spec('gemlite')" 2>/dev/null \
      && ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

bench=("$py" -m effllm_utils.cli.bench)
for s in "${@:-tests decode train}"; do
  for s in $s; do
    case $s in
      tests|decode|decode05|dtrace|hardware|study) wheels ;;
    esac
    case $s in
      tests) step tests 360 "$py" -m pytest -q -rs tests/test_w4a16.py tests/test_models.py tests/test_telemetry.py -k cuda ;;
      decode) step decode 540 "${bench[@]}" --mode decode --skip-eager --decode-shapes qwen2.5-1.5b \
                --decode-variants static_compiled,int4_tinygemm,int4_gemlite ;;
      decode05) step decode05 480 "${bench[@]}" --mode decode --skip-eager --decode-shapes qwen2.5-0.5b \
                  --decode-variants static_compiled,int4_tinygemm,int4_gemlite ;;
      train) step train 420 "${bench[@]}" --shape gpu_large --cases effllm_dense_compiled,effllm_dense_ce_compiled \
               --steps 20 --skip 8 ;;
      dtrace) step dtrace 400 "${bench[@]}" --mode decode --skip-eager --decode-shapes qwen2.5-0.5b --trace \
                --decode-variants triton_gemv,int4 ;;
      tuned) step tuned 540 "${bench[@]}" --shape gpu_large --cases effllm_dense_ce_compiled --steps 14 --skip 6 \
               --compile-mode max-autotune-no-cudagraphs ;;
      levers) step levers_accum4 300 "${bench[@]}" --shape gpu_large --cases effllm_dense_compiled --grad-accum 4 \
                --steps 10 --skip 4
              step levers_batch32 300 "${bench[@]}" --shape gpu_large --cases effllm_dense_ce_compiled --batch 32 \
                --steps 14 --skip 6 ;;
      trace) step trace 300 "${bench[@]}" --shape gpu_large --cases effllm_dense_compiled --steps 14 --skip 8 --trace ;;
      hardware) step hardware 300 "$py" -m effllm_utils.cli.reproduce --profile gpu --only hardware
        tar czf "$out/gpu_hardware.tgz" outputs/gpu/runs/hardware outputs/gpu/figures outputs/gpu/tables 2>/dev/null ;;
      study)
        step study 540 "$py" -m effllm_utils.cli.reproduce --profile gpu --only attention --set dataset=embedded \
          --set tokenizer=embedded --set steps=100 --set eval_every=1000 --set lr_sweep_points=0 --set trackers=none
        tar czf "$out/gpu_attention.tgz" --exclude=outputs/gpu/checkpoints outputs/gpu 2>/dev/null ;;
      *) echo "unknown step $s; steps: tests decode decode05 dtrace train tuned levers trace hardware study" >&2; exit 2 ;;
    esac
  done
done
