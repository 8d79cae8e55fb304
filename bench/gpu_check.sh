#!/usr/bin/env bash
# First-GPU check: everything the CPU machines could not measure, in one run of ≤ 8 minutes
# on one H100/H200, ending in a Markdown report for bench/RESULTS.md.
#
#   bash bench/gpu_check.sh            # on a CUDA machine (fails at once without one)
#   bash bench/gpu_check.sh --smoke    # on a CPU, tiny sizes: checks that every step runs
#
# Steps, in priority order (each under its own timeout, all under one 8-minute budget; a step
# that fails or times out is reported and the next one still runs):
#   1. pytest -m gpu                    the CUDA tests (tests/test_cuda.py)
#   2. training step, paper-1.5b shape  Free Transformer and baseline, bf16 autocast, eager,
#                                       T 4096, B 1, step time and MFU (FLOPs: bench/theory.py)
#   3. decoding                         ms/token of the default generate, FT vs baseline,
#                                       eager and static (CUDA graph), d512-L8 and paper-1.5b
#                                       (bench_decode.py)
#   4. training step, torch.compile     as 2, compiled per block (first-step = compile time)
#   5. binary mapper                    backward against its 2·N·2^H·D GEMM bound
#   6. one-GPU FSDP2 step               torchrun --nproc_per_node=1, 4 micro-batches, bf16
#                                       MixedPrecisionPolicy, against the same run without
#                                       FSDP (losses must agree to bf16 rounding)
#
# Environment: PYTHON (default: python3), OUT (the report goes to $OUT/gpu_check.md, logs to
# $OUT/gpu_check/; default: a temporary directory), PEAK_TFLOPS (dense bf16 peak of the GPU
# for MFU; known for H100/H200/A100/B200), GPU_CHECK_BUDGET (seconds, default 480),
# GPU_CHECK_COMPILE=0 (skip step 6; on --smoke it is most of the ~5 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $a (use --smoke or nothing)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
BUDGET="${GPU_CHECK_BUDGET:-480}"
REPORT_DIR="${OUT:-$(mktemp -d)}"
LOGS="$REPORT_DIR/gpu_check"
mkdir -p "$LOGS"
REPORT="$REPORT_DIR/gpu_check.md"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [ "$SMOKE" = 1 ]; then
  DEV=cpu
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  DEV=cuda
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False);" \
         "run it on a GPU machine with a CUDA build of torch, or pass --smoke to test the script on a CPU" >&2
    exit 1
  fi
fi

# Dense bf16 peak (TFLOP/s) for MFU.
if [ -z "${PEAK_TFLOPS:-}" ]; then
  if [ "$SMOKE" = 1 ]; then
    PEAK_TFLOPS=1
  else
    PEAK_TFLOPS="$("$PY" - <<'EOF'
import torch
n = torch.cuda.get_device_name(0)
peaks = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("H800", 989), ("A100", 312),
         ("B200", 2250), ("L40S", 362)]
print(next((str(p) for k, p in peaks if k in n), ""))
EOF
)"
  fi
fi
MFU_ARGS=()
[ -n "$PEAK_TFLOPS" ] && MFU_ARGS=(--peak-tflops "$PEAK_TFLOPS")

START=$SECONDS
ROWS=()
FAILED=0

# run NAME TIMEOUT CMD...: run under min(TIMEOUT, budget left); log to $LOGS/NAME.log.
run() {
  local name="$1" limit="$2"
  shift 2
  local left=$(( BUDGET - (SECONDS - START) ))
  if [ "$left" -lt 20 ]; then
    ROWS+=("| $name | skipped (8-minute budget spent) | 0 |")
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "== $name (limit ${limit}s): $*" >&2
  local t0=$SECONDS rc=0
  timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  local dt=$(( SECONDS - t0 )) status="ok"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status="TIMEOUT after ${limit}s"; FAILED=1
  elif [ "$rc" != 0 ]; then
    status="FAILED (exit $rc): $(grep -v '^\s*$' "$LOGS/$name.log" | tail -1 | tr '|' '/' | cut -c1-150)"
    FAILED=1
  fi
  ROWS+=("| $name | $status | $dt |")
  echo "   $status, ${dt}s" >&2
}

if [ "$SMOKE" = 1 ]; then
  TRAIN_SHAPE=(--shapes debug --bits 8 --rounds 1)
  MAPPER=(--smoke --rounds 1)
  GEN=(--shapes debug --new-tokens 8 --rounds 1)
  FSDP_MODEL=(--preset debug)
  FSDP_BATCH=(--train.batch_size=8 --train.micro_batch_size=2)
else
  TRAIN_SHAPE=(--shapes paper-1.5b --bits 16 --rounds 3)
  MAPPER=(--parts bwd --rounds 5)
  GEN=(--shapes d512-L8,paper-1.5b --new-tokens 128 --rounds 2)
  # The paper's 1.5B width and latent (D 1536, H 16) with 4 layers, on the
  # synthetic task (no data to prepare): a step of FSDP2 + NCCL + accumulation + checkpoint.
  # (Vocabulary 2^15 instead of 2^17 keeps the two final checkpoints at ~4 GB each.)
  FSDP_MODEL=(--config configs/paper-1.5b.toml --model.n_layers=4 --model.vocab_size=32768
              --data.source=synthetic --train.seq_len=65)
  FSDP_BATCH=(--train.batch_size=64 --train.micro_batch_size=16)
fi

# 1. The CUDA tests (on --smoke they are collected and skipped: no CUDA).
run gpu-tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda.py

# 2. Training step at the paper's 1.5B shape, bf16 autocast, eager, with MFU.
run train-step 120 "$PY" bench/bench_train.py --device "$DEV" --dtype bf16 "${TRAIN_SHAPE[@]}" \
  --impls ours-ft,ours-base --section gpu-check "${MFU_ARGS[@]}"

# 3. Decoding speed, eager and static (exit 1 if static and eager fp32 tokens differ).
run decode 150 "$PY" bench/bench_decode.py --device "$DEV" --dtype bf16 "${GEN[@]}"

# 4. The same training step compiled, with the time left.
if [ "${GPU_CHECK_COMPILE:-1}" = 0 ]; then
  ROWS+=("| train-step-compiled | skipped (GPU_CHECK_COMPILE=0) | 0 |")
else
  run train-step-compiled 200 "$PY" bench/bench_train.py --device "$DEV" --dtype bf16 --compile \
    "${TRAIN_SHAPE[@]}" --impls ours-ft,ours-base --section gpu-check-compiled "${MFU_ARGS[@]}"
fi

# 5. The mapper's backward against its FLOP bound.
run mapper 60 "$PY" bench/bench_mapper.py --device "$DEV" --dtype bf16 "${MAPPER[@]}"

# 6. One-process FSDP2 step, against the same run without distribution.
FSDP_COMMON=("${FSDP_MODEL[@]}" "${FSDP_BATCH[@]}" --train.max_steps=4 --train.log_every=1
             --train.eval_every=0 --train.ckpt_every=0 --train.compile=false
             --train.precision=bf16 --train.device="$DEV" --quiet)
run fsdp-1gpu 90 "$PY" -m torch.distributed.run --nproc_per_node=1 --master_port=29651 \
  -m freeformer train --out "$WORK/fsdp" "${FSDP_COMMON[@]}" --train.dist=fsdp
run no-dist-ref 60 "$PY" -m freeformer train --out "$WORK/plain" "${FSDP_COMMON[@]}" --train.dist=none
FSDP_LINE="$("$PY" - "$WORK/fsdp" "$WORK/plain" <<'EOF' 2>&1 || true
import json, sys
from pathlib import Path

def recs(d):
    p = Path(d) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []

a, b = recs(sys.argv[1]), recs(sys.argv[2])
a = [r for r in a if r.get("kind") != "val"]
b = [r for r in b if r.get("kind") != "val"]
if not a:
    print("FSDP run wrote no metrics")
else:
    tps = a[-1]["tokens_per_s"]
    diff = max((abs(x["loss"] - y["loss"]) for x, y in zip(a, b)), default=float("nan"))
    losses = ", ".join(f"{r['loss']:.4f}" for r in a)
    print(f"FSDP2, 1 process, 4 micro-batches: losses {losses}; "
          f"last step {tps:,.0f} tokens/s; max |loss(FSDP) − loss(no dist)| over "
          f"{min(len(a), len(b))} steps = {diff:.2e}")
EOF
)"

# ---- report: a status table, then each benchmark's own Markdown section.
body() {  # the Markdown a benchmark printed at its end (from its first "## " heading)
  [ -f "$LOGS/$1.log" ] && awk '/^## /{p=1} p' "$LOGS/$1.log" || true
}
MACHINE="$("$PY" - "$DEV" <<'EOF' 2>/dev/null || echo unknown
import sys
import torch
if sys.argv[1] == "cuda":
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}")
else:
    print(f"CPU smoke test, torch {torch.__version__}")
EOF
)"
{
  echo "<!-- BEGIN gpu-check -->"
  echo "## First-GPU check (\`bench/gpu_check.sh$([ "$SMOKE" = 1 ] && echo ' --smoke')\`)"
  echo
  echo "Machine: $MACHINE; $(date -u '+%Y-%m-%d %H:%M UTC'); repo at $(git rev-parse --short HEAD 2>/dev/null || echo '?');" \
       "MFU peak: ${PEAK_TFLOPS:-unknown} TFLOP/s (dense bf16); total $(( SECONDS - START )) s."
  [ "$SMOKE" = 1 ] && echo && echo "**Smoke test on a CPU at tiny sizes: the figures below mean nothing.**"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "$FSDP_LINE"
  echo
  echo "### pytest -m gpu"
  echo
  echo '```'
  tail -5 "$LOGS/gpu-tests.log" 2>/dev/null || true
  echo '```'
  for s in train-step decode train-step-compiled mapper; do
    echo
    body "$s" | sed 's/^\(##*\) /#\1 /'  # one level down
  done
  echo "<!-- END gpu-check -->"
} >"$REPORT"
cat "$REPORT"
echo >&2
echo "report: $REPORT (logs in $LOGS)" >&2
exit "$FAILED"
