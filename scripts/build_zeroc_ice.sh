#!/usr/bin/env bash
# Build a zeroc-ice 3.6.5 wheel, the Ice runtime that every omero-py release requires
# (zeroc-ice>=3.6.5,<3.7). PyPI has no Linux wheel of it, and its sdist does not compile on
# Python >= 3.11 without two one-line patches, which this script applies:
#   src/Slice.cpp: drop `#include <eval.h>` (the header is gone; Python.h declares the same);
#   src/Util.cpp:  `PyThreadState_GET()->frame` -> `PyEval_GetFrame()` (the member is gone).
# Both changes are also valid on older Pythons. Needs a C++ compiler and the OpenSSL and bzip2
# headers (Debian/Ubuntu: apt-get install g++ libssl-dev libbz2-dev); takes ~5 min on 2 cores.
#
# Usage:  bash scripts/build_zeroc_ice.sh [OUT_DIR]          (default OUT_DIR: ./wheels)
#         PYTHON=/path/to/venv/bin/python bash scripts/build_zeroc_ice.sh
# Then:   pip install OUT_DIR/zeroc_ice-3.6.5-*.whl 'conic-qp[omero]'
#
# Prebuilt wheels are published by Glencoe Software on the GitHub releases of
# glencoesoftware/zeroc-ice-py-linux-x86_64 (manylinux2014), -linux-aarch64, -rhel8-x86_64 and
# -rhel9-x86_64 (PyPI has the Windows wheels); installing one of those skips this build.
set -euo pipefail

PYTHON=${PYTHON:-python3}
OUT=${1:-wheels}
VERSION=3.6.5
SHA256=4235ffeb605bcd4e22e716577f7d61e4aa1bc82f65276bb542701a81b7933356  # PyPI sdist

command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found; set PYTHON=..." >&2; exit 2; }
command -v c++ >/dev/null || command -v g++ >/dev/null || {
    echo "error: no C++ compiler; install one (Debian/Ubuntu: apt-get install g++)" >&2; exit 2; }
for header in openssl/ssl.h bzlib.h; do
    if ! echo "#include <$header>" | c++ -E -x c++ - >/dev/null 2>&1; then
        echo "error: <$header> not found; install the OpenSSL and bzip2 development headers" \
             "(Debian/Ubuntu: apt-get install libssl-dev libbz2-dev)" >&2
        exit 2
    fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "downloading the zeroc-ice $VERSION sdist from PyPI"
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "zeroc-ice==$VERSION" -d "$work"
sdist="$work/zeroc-ice-$VERSION.tar.gz"
"$PYTHON" - "$sdist" "$SHA256" <<'PY'
import hashlib, sys
path, want = sys.argv[1], sys.argv[2]
got = hashlib.sha256(open(path, "rb").read()).hexdigest()
if got != want:
    sys.exit(f"error: {path} has sha256 {got}, expected {want}")
PY
tar xzf "$sdist" -C "$work"
src="$work/zeroc-ice-$VERSION"

echo "patching the sources for Python >= 3.11"
"$PYTHON" - "$src" <<'PY'
import pathlib, sys
src = pathlib.Path(sys.argv[1])
patches = [
    ("src/Slice.cpp", "#include <eval.h>\n", ""),
    ("src/Util.cpp", "PyThreadState_GET()->frame", "PyEval_GetFrame()"),
]
for rel, old, new in patches:
    f = src / rel
    text = f.read_text()
    if old not in text:
        sys.exit(f"error: {rel} does not contain {old.strip()!r}; not the expected sdist")
    f.write_text(text.replace(old, new))
PY

mkdir -p "$OUT"
echo "compiling (a few minutes)"
nice -n "${NICE:-10}" "$PYTHON" -m pip wheel --quiet --no-deps -w "$OUT" "$src"
wheel=$(ls -t "$OUT"/zeroc_ice-"$VERSION"-*.whl | head -n1)
echo "built $wheel"
echo "install with: $PYTHON -m pip install '$wheel'"
