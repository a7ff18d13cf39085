#!/usr/bin/env bash
# Speed check on a GPU machine (Python 3.12, jax with CUDA, torch and timm preinstalled, no network):
#   bash bench/gpu_check.sh [BATCH] [STEPS]
# Swin-T -> ResNet18 RSD at 224, batch 256 (2 statistics groups of 128, as the reference on 2 GPUs): the JAX step
# in fp32 and bf16, the torch baseline in fp32 and AMP (bf16 autocast), one fresh process each, then a table.
# Budget: about 1-2 min of build (the random teacher is initialised op by op) and compile per JAX run, a few
# seconds of torch warm-up; every run is capped by `timeout`
# (165+165+55+55 s) so the whole script stays under 8 minutes.
set -u
cd "$(dirname "$0")/.."
BATCH=${1:-256}
STEPS=${2:-10}
CONFIG=configs/swin_resnet18.py
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false     # peak memory of the step, not of the allocator's pool
export TF_CPP_MIN_LOG_LEVEL=3
unset JAX_COMPILATION_CACHE_DIR                 # compile_s is a real compile
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import jax, torch, timm; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, \
torch.cuda.is_available(), '| timm', timm.__version__)"

run() {   # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.err"
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" >&2
  [ $rc -eq 0 ] || tail -5 "$OUT/$name.err" >&2
}

run jax_fp32   165 $PY -m rsd_jax.bench --config $CONFIG --batch "$BATCH" --steps "$STEPS" --dtype float32
run jax_bf16   165 $PY -m rsd_jax.bench --config $CONFIG --batch "$BATCH" --steps "$STEPS" --dtype bfloat16
run torch_fp32  55 $PY -m bench.torch_bench --config $CONFIG --batch "$BATCH" --steps "$STEPS"
run torch_amp   55 $PY -m bench.torch_bench --config $CONFIG --batch "$BATCH" --steps "$STEPS" --amp

$PY - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = {}
for name in ("jax_fp32", "jax_bf16", "torch_fp32", "torch_amp"):
    try:
        with open(os.path.join(out, name + ".json")) as f:
            rows[name] = json.loads([l for l in f if l.startswith("{")][-1])
    except (OSError, IndexError, ValueError):
        rows[name] = None
fmt = "{:<11} {:>9} {:>9} {:>10} {:>8} {:>7} {:>9} {:>9}"
print(fmt.format("run", "img/s", "ms/step", "compile_s", "TFLOP/s", "MFU%", "peak GiB", "loss"))
for name, r in rows.items():
    if r is None:
        print(fmt.format(name, "failed", "", "", "", "", "", ""))
        continue
    g = lambda k, f: f.format(r[k]) if r.get(k) is not None else "-"
    mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "-"
    mfu = f"{100 * r['mfu']:.1f}" if r.get("mfu") is not None else "-"
    print(fmt.format(name, g("images_per_s", "{:.1f}"), g("step_ms", "{:.1f}"), g("compile_s", "{:.1f}"),
                     g("tflops_per_s", "{:.1f}"), mfu, mem, g("loss", "{:.3f}")))
j = {k: rows[k]["images_per_s"] for k in ("jax_fp32", "jax_bf16") if rows[k]}
t = {k: rows[k]["images_per_s"] for k in ("torch_fp32", "torch_amp") if rows[k]}
if "jax_fp32" in j and "torch_fp32" in t:
    print(f"JAX/torch fp32: {j['jax_fp32'] / t['torch_fp32']:.2f}")
if "jax_bf16" in j and "torch_amp" in t:
    print(f"JAX bf16 / torch AMP: {j['jax_bf16'] / t['torch_amp']:.2f}")
print(f"JSON lines in {out}")
PY
