#!/usr/bin/env bash
# Speed check on a GPU machine (Python 3.12, jax with CUDA, torch and timm preinstalled, no network):
#   bash bench/gpu_check.sh [BATCH] [STEPS] [BUDGET_S]
# Swin-T -> ResNet18 RSD at 224, batch 256 (2 statistics groups of 128, as the reference on 2 GPUs): the JAX step
# in bf16 (with a profile of 3 more steps: device time per kernel) and fp32, and the torch baseline in AMP (bf16
# autocast) eager and under torch.compile (default mode; its first step holds the compile), fp32, and fp32 with TF32
# matrix products (JAX's float32 default on a GPU), one fresh process each; then, while the budget lasts, bf16 / AMP
# at 4x the batch. Runs go in that order of importance,
# each capped by `timeout` and by what is left of BUDGET_S (default 480 s), so the whole script stays under
# 8 minutes; a run that does not fit is reported as skipped. Prints a table; JSON lines and logs go to $OUT.
# The lent machines lack ml_collections (jax, flax, optax, orbax, torch and timm are there): download its wheel
# into .whl/ here (pip download --no-deps --python-version 3.12 ml_collections==1.1.0), carry it, and start the
# call with `pip install --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site`.
set -u
cd "$(dirname "$0")/.."
BATCH=${1:-256}
STEPS=${2:-20}
BUDGET=${3:-480}
CONFIG=${CONFIG:-configs/swin_resnet18.py}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
LOG=$OUT/runs.log
: > "$RESULTS"; : > "$LOG"
export XLA_PYTHON_CLIENT_PREALLOCATE=false     # peak memory of the step, not of the allocator's pool
export TF_CPP_MIN_LOG_LEVEL=3
export PYTHONUNBUFFERED=1
unset JAX_COMPILATION_CACHE_DIR                 # compile_s is a real compile
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
$PY -c "import jax, flax, optax, torch, timm; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, \
'| optax', optax.__version__, '| torch', torch.__version__, torch.cuda.is_available(), '| timm', timm.__version__)"

run() {   # name, cap in seconds, command...: one JSON line tagged with `name` into $RESULTS
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - SECONDS))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 30 ]; then echo "$name: skipped (budget)" >&2; return; fi
  local start=$SECONDS
  echo "=== $name: $* (limit $limit s)" >> "$LOG"
  timeout "$limit" "$@" --json > "$OUT/last.json" 2>> "$LOG"
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" >&2
  if [ $rc -eq 0 ]; then
    $PY -c "import json, sys; r = json.loads([l for l in open(sys.argv[1]) if l.startswith('{')][-1]); \
r['run'] = sys.argv[2]; print(json.dumps(r))" "$OUT/last.json" "$name" >> "$RESULTS"
  else
    tail -5 "$LOG" >&2
  fi
}

B4=$((4 * BATCH))
run jax_bf16     150 $PY -m rsd_jax.bench --config $CONFIG --batch "$BATCH" --steps "$STEPS" --dtype bfloat16 \
  --profile 3
run torch_amp     60 $PY -m bench.torch_bench --config $CONFIG --batch "$BATCH" --steps "$STEPS" --amp
run torch_compile_amp 180 $PY -m bench.torch_bench --config $CONFIG --batch "$BATCH" --steps "$STEPS" --amp --compile
run jax_fp32     150 $PY -m rsd_jax.bench --config $CONFIG --batch "$BATCH" --steps "$STEPS" --dtype float32
run torch_fp32    60 $PY -m bench.torch_bench --config $CONFIG --batch "$BATCH" --steps "$STEPS"
run torch_tf32    60 $PY -m bench.torch_bench --config $CONFIG --batch "$BATCH" --steps "$STEPS" --tf32
run jax_bf16_x4  150 $PY -m rsd_jax.bench --config $CONFIG --batch "$B4" --steps "$STEPS" --dtype bfloat16
run torch_amp_x4  60 $PY -m bench.torch_bench --config $CONFIG --batch "$B4" --steps "$STEPS" --amp

$PY - "$RESULTS" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[r["run"]] = r
fmt = "{:<17} {:>6} {:>9} {:>9} {:>9} {:>8} {:>6} {:>9} {:>8}"
print(fmt.format("run", "batch", "img/s", "ms/step", "compile_s", "TFLOP/s", "MFU%", "peak GiB", "loss"))
for name in ("jax_bf16", "torch_amp", "torch_compile_amp", "jax_fp32", "torch_fp32", "torch_tf32", "jax_bf16_x4",
             "torch_amp_x4"):
    r = rows.get(name)
    if r is None:
        print(fmt.format(name, "", "failed or skipped", "", "", "", "", "", ""))
        continue
    g = lambda k, f: f.format(r[k]) if r.get(k) is not None else "-"
    mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "-"
    mfu = f"{100 * r['mfu']:.1f}" if r.get("mfu") is not None else "-"
    compile_s = g("compile_s", "{:.1f}") if "compile_s" in r else g("first_step_s", "{:.1f}")   # torch: 1st step
    print(fmt.format(name, r["batch"], g("images_per_s", "{:.1f}"), g("step_ms", "{:.1f}"), compile_s,
                     g("tflops_per_s", "{:.1f}"), mfu, mem, g("loss", "{:.3f}")))
ips = {k: r["images_per_s"] for k, r in rows.items()}
for a, b in (("jax_bf16", "torch_amp"), ("jax_bf16", "torch_compile_amp"), ("jax_fp32", "torch_fp32"),
             ("jax_fp32", "torch_tf32"),
             ("jax_bf16_x4", "torch_amp_x4")):
    if a in ips and b in ips:
        print(f"{a} / {b}: {ips[a] / ips[b]:.2f}")
kernels = rows.get("jax_bf16", {}).get("profile", {}).get("kernels")
if kernels:
    print(f"jax_bf16 device time {kernels['ms_per_step']:.1f} ms/step in {kernels['distinct']} kernels; the top 12:")
    for k in kernels["top"][:12]:
        print(f"  {k['ms_per_step']:6.2f} ms x{k['calls_per_step']:<4g} {k['name'][:60]}  "
              f"{k['stats'].get('name', k['stats'].get('hlo_op', ''))[-50:]}")
print(f"JSON lines in {sys.argv[1]}")
PY
