#!/usr/bin/env bash
# The one prepared command for a GPU machine that has torch and triton but no package index:
# installs Liger / Cut Cross-Entropy from a local wheel folder where they are missing, runs the
# GPU tests, then the h100 benchmark into OUTDIR, all within --total-s (default 480 s).
# The last thing it prints is the headline table. Steps and options: bench/README.md.
#
#   bench/run_gpu.sh OUTDIR [--wheels DIR] [--total-s S] [--no-tests] [--preset h100]
#                           [--results DIR] [--tune-s S]
# --tune-s S: afterwards, S more seconds of bench/tune_fused.py (fused launch configs) into
# OUTDIR/tune; not part of the 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
    echo "usage: bench/run_gpu.sh OUTDIR [--wheels DIR (.whl)] [--total-s S (480)]" \
        "[--no-tests] [--preset NAME (h100)] [--results DIR (bench/results)] [--tune-s S (0)]"
}

OUT=""
WHEELS=.whl
TOTAL=480
TESTS=1
PRESET=h100
RESULTS=bench/results
TUNE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --total-s) TOTAL=$2; shift 2 ;;
        --no-tests) TESTS=0; shift ;;
        --preset) PRESET=$2; shift 2 ;;
        --results) RESULTS=$2; shift 2 ;;
        --tune-s) TUNE=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "unknown option: $1"; usage; exit 2 ;;
        *) OUT=$1; shift ;;
    esac
done
[ -n "$OUT" ] || { usage; exit 2; }
mkdir -p "$OUT"

main() {
    local start=$SECONDS
    # The package is used from this checkout, not installed.
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
    python3 -c "import matplotlib" 2>/dev/null ||
        echo "matplotlib missing: no plots here; draw them later with run.py --report-only"

    # Baselines: only where missing, from the wheel folder, into a private site (never the
    # system's); both are pure-Python wheels whose only dependencies are torch and triton.
    local site=${TMPDIR:-/tmp}/tofu-bench-site
    export PYTHONPATH="$PYTHONPATH:$site"
    local mod whl
    for mod in liger_kernel cut_cross_entropy; do
        if python3 -c "import $mod" 2>/dev/null; then
            echo "$mod: already importable"
            continue
        fi
        whl=$(ls "$WHEELS"/"$mod"-*.whl 2>/dev/null | sort | tail -n 1)
        if [ -z "$whl" ]; then
            echo "$mod: missing, no wheel in $WHEELS: its rows will say unavailable"
            continue
        fi
        if ! python3 -m pip install -q --no-index --no-deps --target "$site" "$whl"; then
            # A wheel is a zip: a pure-Python one works unpacked, even without pip.
            python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
                "$whl" "$site"
        fi
        python3 -c "import $mod" && echo "$mod: installed from $whl"
    done

    local tests_rc=0
    if [ "$TESTS" = 1 ]; then
        echo "== GPU tests (pytest -m gpu)"
        # test_gpu.py alone: collecting the whole suite imports transformers and the rest
        timeout 150 python3 -m pytest -v --tb=short -m gpu -p no:cacheprovider tests/test_gpu.py
        tests_rc=$?
        echo "== GPU tests: exit code $tests_rc after $((SECONDS - start)) s"
    fi

    # What is left of the total, less a margin for imports, the reports, and the 30 s of grace
    # that run.py gives a provider started just before its deadline; `timeout` is the last resort.
    local budget=$((TOTAL - (SECONDS - start) - 60))
    [ "$budget" -gt 60 ] || budget=60
    echo "== benchmark: preset $PRESET, budget $budget s"
    timeout $((budget + 90)) python3 bench/run.py --preset "$PRESET" --out "$OUT" \
        --budget-s "$budget" --publish "$RESULTS"
    local bench_rc=$?
    if [ "$bench_rc" -ne 0 ] && [ -s "$OUT/results.json" ]; then
        # Killed or crashed: results.json holds every finished case; report those.
        echo "== benchmark exit code $bench_rc: reporting the cases it finished"
        python3 bench/run.py --preset "$PRESET" --out "$OUT" --report-only --publish "$RESULTS"
    fi
    if [ "$TUNE" -gt 0 ]; then
        echo "== fused launch configs: bench/tune_fused.py, budget $TUNE s"
        timeout $((TUNE + 60)) python3 bench/tune_fused.py --budget-s "$TUNE" --out "$OUT/tune"
    fi
    [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
}

main 2>&1 | tee "$OUT/run_gpu.log"
exit "${PIPESTATUS[0]}"
