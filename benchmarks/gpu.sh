#!/usr/bin/env bash
# Every benchmark table on one device and dtype, in one call, in at most 8 minutes: the GPU run.
#
#   benchmarks/gpu.sh                                   # --device cuda --dtype bfloat16, into benchmarks/out-gpu/
#   benchmarks/gpu.sh --dry                             # the plan and the checks only (seconds; no benchmark runs)
#   benchmarks/gpu.sh --device cpu --dtype bfloat16 --tiny --out /tmp/b   # every piece on tiny sizes (a CPU check)
#   benchmarks/gpu.sh --prepare .gpu                    # here, before: what the GPU machine lacks, to carry (~20 MB)
#
# Pieces (each under its own time limit; one that fails or runs out is recorded as such and the
# rest still run): base (bench_base.py: steered / interchange / engine rows, ATen op counts),
# sweep (bench_sweep.py), das (das_speed.py: DAS step ÷ pyvene), reft (reft_speed.py: LoReFT ÷ floor
# beside pyreft and peft LoRA, the every-layer recipe, generation, memory), atp (bench_atp.py, where
# it exists). Output in --out: gpu.json (the machine, each piece's status, every table), gpu.md
# (the same as markdown tables), gpu.log (every piece's output).
#
# The GPU run, from the lead's machine: `benchmarks/gpu.sh --prepare .gpu` here (SmolLM2's config and
# tokenizer, and wheels of pyvene, pyreft, nnsight and what they import), then run `benchmarks/gpu.sh`
# there with `.gpu` carried. Without the 94 MB SmolLM2 package, SmolLM2's architecture runs with random
# weights (speed does not depend on the weights; every table says which). steerlab is installed from
# this checkout (pip -e, no dependencies, offline) when it is not importable. A missing pyreft or
# nnsight drops its rows; a missing pyvene fails the das piece only.
set -uo pipefail

DEVICE=cuda DTYPE=bfloat16 OUT=benchmarks/out-gpu DRY=0 TINY=0 BUDGET=480 PREPARE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --dry) DRY=1; shift ;;
    --tiny) TINY=1; shift ;;
    --prepare) PREPARE=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DTYPE" in float32|bfloat16|float16) ;; *) echo "gpu.sh: --dtype $DTYPE: expected float32, bfloat16 or float16" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ -n "$PREPARE" ]; then
  # What a GPU machine lacks, for carrying (about 20 MB): SmolLM2's config + tokenizer, and the wheels
  # of the peers and their imports (the versions installed here, for CPython 3.12 on x86-64 Linux).
  "$PY" - "$PREPARE/smollm2" <<'EOF' || exit 1
import shutil, sys
from pathlib import Path
from steerlab.models import embedded_path
src, dst = embedded_path("smollm2-135m"), Path(sys.argv[1])
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.is_file() and not f.name.endswith(".safetensors"):
        shutil.copy2(f, dst / f.name)
print(f"wrote SmolLM2's config and tokenizer to {dst} ({sum(f.stat().st_size for f in dst.iterdir()) / 1e6:.1f} MB)")
EOF
  pins=$("$PY" -c 'import importlib.metadata as m, sys; print(" ".join(f"{d}=={m.version(d)}" for d in sys.argv[1:]))' \
    pyvene pyreft nnsight pydantic pydantic_core annotated-types typing-inspection greenlet zstandard datasets dill multiprocess) || exit 1
  plat=""; for n in 17 27 28 34; do plat="$plat --platform manylinux_2_${n}_x86_64"; done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat --platform manylinux2014_x86_64 \
    -d "$PREPARE/wheels" $pins || exit 1
  echo "wrote $(ls "$PREPARE/wheels" | wc -l) wheels to $PREPARE/wheels ($(du -sh "$PREPARE" | cut -f1) in all); on the GPU machine,"
  echo "with $PREPARE carried: benchmarks/gpu.sh (it installs them into /tmp/site and uses $PREPARE/smollm2)"
  exit 0
fi

have() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
# a carried .gpu/ (written by --prepare .gpu): the wheels go to /tmp/site (where the peers are missing),
# SmolLM2's shape is used where the package is absent
if [ -d .gpu/wheels ] && ! have pyvene; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .gpu/smollm2 ] && export STEERLAB_BENCH_SMOLLM=${STEERLAB_BENCH_SMOLLM:-$ROOT/.gpu/smollm2}

if ! "$PY" -c "import steerlab" 2>/dev/null; then
  if [ $DRY = 1 ]; then echo "setup: steerlab is not importable; the run would first: $PY -m pip install --no-deps --no-build-isolation -e ."
  else "$PY" -m pip install -q --no-deps --no-build-isolation -e . || { echo "gpu.sh: could not install steerlab from $ROOT" >&2; exit 1; }
  fi
fi

NNSIGHT=""; have nnsight || NNSIGHT="--no-nnsight"
PYREFT=""; have pyreft || PYREFT="--no-pyreft"

# name | seconds | command (the tiny variant adds its flags at the end)
if [ $TINY = 1 ]; then
  PIECES=(
    "base|300|benchmarks/bench_base.py --device $DEVICE --dtype $DTYPE --quick --no-import --no-sweep $NNSIGHT --models deep"
    "sweep|240|benchmarks/bench_sweep.py --device $DEVICE --dtype $DTYPE --quick --models deep --every 15"
    "das|240|benchmarks/das_speed.py --device $DEVICE --dtype $DTYPE --quick --no-search --layers 2 --batch 2"
    "reft|240|benchmarks/reft_speed.py --device $DEVICE --dtype $DTYPE $PYREFT --models narrow --batch 2 --seq 16 --repeats 1 --inner 1 --new-tokens 2"
    "atp|60|benchmarks/bench_atp.py --device $DEVICE --dtype $DTYPE --quick --models deep"
  )
  BUDGET=$((BUDGET > 1500 ? BUDGET : 1500))
else
  PIECES=(
    "base|110|benchmarks/bench_base.py --device $DEVICE --dtype $DTYPE --quick --no-import --no-sweep $NNSIGHT"
    "sweep|90|benchmarks/bench_sweep.py --device $DEVICE --dtype $DTYPE --quick"
    "das|90|benchmarks/das_speed.py --device $DEVICE --dtype $DTYPE --quick --no-search --layers 6,15,25"
    "reft|130|benchmarks/reft_speed.py --device $DEVICE --dtype $DTYPE $PYREFT --repeats 5"
    "atp|45|benchmarks/bench_atp.py --device $DEVICE --dtype $DTYPE --quick"
  )
fi

if [ $DRY = 1 ]; then
  "$PY" - "$DEVICE" <<'EOF'
import importlib.util, sys
import torch
sys.path.insert(0, "benchmarks")
import _models
dev = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
if dev.startswith("cuda") and not torch.cuda.is_available():
    print("WARNING: --device cuda but torch sees no GPU")
print("packages: " + ", ".join(f"{m} {'yes' if importlib.util.find_spec(m) else 'MISSING'}"
                               for m in ("steerlab", "transformers", "pyvene", "pyreft", "peft", "nnsight", "plotly")))
print(f"SmolLM2: {_models.smollm_source()}")
EOF
fi

[ $DRY = 1 ] || mkdir -p "$OUT"
[ $DRY = 1 ] || : > "$OUT/rows.jsonl"
[ $DRY = 1 ] || : > "$OUT/pieces.jsonl"
[ $DRY = 1 ] || : > "$OUT/gpu.log"
export STEERLAB_BENCH_JSON="$ROOT/$OUT/rows.jsonl"
case "$OUT" in /*) export STEERLAB_BENCH_JSON="$OUT/rows.jsonl" ;; esac
START=$(date +%s)
total=0
for piece in "${PIECES[@]}"; do
  IFS='|' read -r name limit cmd <<< "$piece"
  script=${cmd%% *}
  total=$((total + limit))
  if [ ! -f "$script" ]; then
    echo "$name: $script does not exist here: skipped"
    [ $DRY = 1 ] || echo "{\"name\": \"$name\", \"status\": \"absent\", \"seconds\": 0, \"command\": \"$cmd\"}" >> "$OUT/pieces.jsonl"
    continue
  fi
  if [ $DRY = 1 ]; then
    help=$("$PY" $script --help 2>&1) || { echo "$name: $script --help failed: $help" >&2; exit 1; }
    for flag in $(echo "${cmd#* }" | tr ' ' '\n' | grep '^--'); do
      grep -q -- "$flag" <<< "$help" || { echo "$name: $script does not take $flag" >&2; exit 1; }
    done
    echo "$name (at most ${limit}s): $PY $cmd"
    continue
  fi
  left=$((BUDGET - ($(date +%s) - START)))
  if [ $left -le 10 ]; then
    status="skipped: the ${BUDGET}s budget is spent"; secs=0
  else
    run_for=$((limit < left ? limit : left))
    echo "== $name: $PY $cmd (at most ${run_for}s)" | tee -a "$OUT/gpu.log"
    t0=$(date +%s)
    timeout --kill-after=10 "$run_for" "$PY" $cmd >> "$OUT/gpu.log" 2>&1
    rc=$?
    secs=$(($(date +%s) - t0))
    case $rc in 0) status=ok ;; 124|137) status="timed out after ${run_for}s" ;; *) status="failed (exit $rc)" ;; esac
    echo "   $status in ${secs}s" | tee -a "$OUT/gpu.log"
  fi
  "$PY" -c 'import json, sys; print(json.dumps(dict(name=sys.argv[1], status=sys.argv[2], seconds=int(sys.argv[3]), command=sys.argv[4])))' \
    "$name" "$status" "$secs" "$cmd" >> "$OUT/pieces.jsonl"
done
if [ $DRY = 1 ]; then
  echo "plan: $total s of limits within a ${BUDGET}s budget; output would go to $OUT/gpu.json, gpu.md, gpu.log"
  [ $total -le $((BUDGET + 60)) ] || [ $TINY = 1 ] || { echo "the limits add up to more than the budget" >&2; exit 1; }
  exit 0
fi
"$PY" benchmarks/_collect.py "$OUT" --device "$DEVICE" --dtype "$DTYPE"
rc=$?
echo "total $(($(date +%s) - START)) s"
exit $rc
