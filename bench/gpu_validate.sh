#!/usr/bin/env bash
# Issue 9's GPU validation in one call, from the repository root on the lent machine:
#
#   bash bench/gpu_validate.sh              # every step
#   bash bench/gpu_validate.sh exp3 baseline   # env, wheels and these (a second call, if one ran short)
#
# Steps: env (device, driver, versions), wheels (carried .whl/*.whl, if any), tests (pytest -m gpu),
# swap (bench/swap.py --device cuda --disk), exp3 (djinn scenario run exp3 --headless, CUDA
# defaults), baseline (the same with baseline=hold-all). A failed step does not stop the next;
# each step's exit code and seconds go to $OUT/steps.txt. Not in the default list: drift (issue 24's
# two daemon tests alone, which `tests` runs too: `bash bench/gpu_validate.sh drift` for a rerun).
#
# Issue 24: every CUDA sample compares the daemon's books with the allocator (drift = allocated -
# load baseline - books, an error over max(64 MiB, 1% of the budget)); exp3's plateau verdict is the
# device's. $OUT/drift.json gathers the figures: the two daemon tests' (tests/test_gpu.py writes
# them under $DJINN_GPU_FIGURES) and exp3's device figures and verdicts on the 13B model.
#
# Both exp3 runs take the budget of the experiment's own card, an 80 GB H100 (the daemon's default
# there: 0.9 x 79.6 GiB), so that a larger card reproduces it: the lent H200 (139 GiB) would hold
# all 50 sessions under its own default, and nothing would need to swap. GV_EXP3_BUDGET=daemon
# keeps the card's own default.
#
# At most 8 files come back from $OUT, so the scenario folders are written under /tmp and come
# back as one runs.tar.gz, with results.json and vram.csv also copied flat beside it:
#   steps.txt  validate.log  swap.json  exp3.results.json  exp3.vram.csv
#   exp3-baseline.results.json  drift.json  runs.tar.gz
# The whole script keeps within GV_BUDGET seconds (default 540: a command may run 10 minutes).
set -u

OUT=${OUT:-$PWD/gpu-out}
BUDGET=${GV_BUDGET:-540}
RUNS=/tmp/gv-runs
export PY=${PYTHON:-python3}
mkdir -p "$OUT" "$RUNS/logs" "$RUNS/figures"
export DJINN_GPU_FIGURES=$RUNS/figures  # issue 24's tests write their figures here
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export DJINN_SOCKET=/tmp/gv-nodaemon/djinnd.sock  # nothing listens: each scenario starts its private daemon
EXP3_BUDGET=${GV_EXP3_BUDGET:-71GiB}
START=$SECONDS
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env wheels tests swap exp3 baseline)
: >"$OUT/steps.txt"

log() { echo "== $*" | tee -a "$OUT/validate.log"; }

# env and wheels always run: a later call may be on a fresh machine
wanted() { local s; for s in env wheels "${STEPS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

# step NAME MAX_SECONDS COMMAND...: run it under a time limit (capped by what is left of the
# budget, 25 s kept for packing up), log its output, record its exit code.
step() {
    local name=$1 max=$2; shift 2
    wanted "$name" || return 0
    local left=$((BUDGET - (SECONDS - START) - 25))
    local limit=$((max < left ? max : left))
    if [ "$limit" -lt 10 ]; then
        log "$name: skipped, no time left"
        echo "$name skipped no-time-left" >>"$OUT/steps.txt"
        return 0
    fi
    log "$name (limit ${limit}s): $*"
    local t0=$SECONDS
    if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a program
        set -- bash -c "$(declare -f "$1"); $1"
    fi
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$RUNS/logs/$name.log" | tee -a "$OUT/validate.log"
    local rc=${PIPESTATUS[0]}
    echo "$name rc=$rc ${limit}s-limit $((SECONDS - t0))s" >>"$OUT/steps.txt"
    log "$name: exit $rc after $((SECONDS - t0)) s"
}

env_info() {
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.gen.current,pcie.link.width.current --format=csv
    free -g
    nproc
    "$PY" - <<'EOF'
import platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("zmq", "textual", "typer", "transformers", "psutil", "pynvml"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:
        print(name, "MISSING:", e)
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device")
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
free, total = torch.cuda.mem_get_info()
print(f"device memory free {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB")
try:  # does the pinned allocator round a pool up (to a power of two)? 3 GiB asked
    x = torch.empty(3 << 30, dtype=torch.uint8, pin_memory=True)
    st = torch.cuda.host_memory_stats()
    print("pinned 3 GiB asked:", {k: v for k, v in st.items() if "bytes" in k and k.endswith(".current")})
    del x
except Exception as e:
    print("host_memory_stats:", e)
EOF
}

wheels() {
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no .whl/ folder: nothing to install"
        return 0
    fi
    ls .whl
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

if ls .whl/*.whl >/dev/null 2>&1; then
    export PYTHONPATH=/tmp/site:$PYTHONPATH  # set here: a step runs in a pipeline, its exports are lost
fi

gpu_procs() { nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv; }

log "gpu_validate: steps ${STEPS[*]}, time budget ${BUDGET}s, exp3 budget $EXP3_BUDGET, OUT=$OUT, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
step env 30 env_info
step wheels 90 wheels
step tests 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors tests
step drift 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "keeps_its_books or judges_its_plateau"
step swap 120 "$PY" bench/swap.py --device cuda --disk --json "$OUT/swap.json"
step exp3 270 "$PY" -m scenarios.cli run exp3 --headless --set budget="$EXP3_BUDGET" --output "$RUNS/exp3"
wanted baseline && gpu_procs | tee -a "$OUT/validate.log"  # memory a leftover daemon would still hold
step baseline 150 "$PY" -m scenarios.cli run exp3 --headless --set budget="$EXP3_BUDGET" --set baseline=hold-all --output "$RUNS/exp3-baseline"

# pack up: a few files flat, everything else in one tarball
for run in exp3 exp3-baseline; do
    [ -f "$RUNS/$run/results.json" ] && cp "$RUNS/$run/results.json" "$OUT/$run.results.json"
done
[ -f "$RUNS/exp3/vram.csv" ] && cp "$RUNS/exp3/vram.csv" "$OUT/exp3.vram.csv"
drift_summary() {  # issue 24's figures in one file: the tests' and exp3's (whichever ran)
    "$PY" - "$RUNS" "$OUT/drift.json" <<'EOF'
import csv, json, pathlib, sys
runs, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
summary = {"tests": {f.stem: json.loads(f.read_text()) for f in sorted((runs / "figures").glob("*.json"))}}
res = runs / "exp3" / "results.json"
if res.is_file():
    r = json.loads(res.read_text())
    vs = r.get("vram_stats") or {}
    summary["exp3"] = {"status": r.get("status"), "model": (r.get("model") or {}).get("name"),
                       "budget_bytes": vs.get("budget_bytes"), "plateau_source": vs.get("plateau_source"),
                       "device": vs.get("device"), "books_peak_bytes": vs.get("max_bytes"),
                       "criteria": {c["id"]: {"ok": c["ok"], "measured": c["measured"]} for c in r.get("criteria") or []}}
    table = runs / "exp3" / "vram.csv"
    rows = list(csv.DictReader(table.open())) if table.is_file() else []
    summary["exp3"]["vram_csv"] = {"columns": list(rows[0]) if rows else [], "rows": len(rows),
                                   "rows_over_drift_limit": sum(1 for x in rows if x.get("drift") and x.get("drift_limit")
                                                                and int(x["drift"]) > int(x["drift_limit"]))}
out.write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: v for k, v in summary.get("exp3", {}).items() if k != "criteria"}, indent=1)[:3000])
EOF
}
drift_summary 2>&1 | tee -a "$OUT/validate.log"
tar -C "$RUNS" -czf "$OUT/runs.tar.gz" . 2>&1 | tail -3
log "done in $((SECONDS - START)) s"
cat "$OUT/steps.txt"
