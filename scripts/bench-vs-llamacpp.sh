#!/usr/bin/env bash
# nextoken against llama.cpp on the same GGUF, on this machine, in one run.
#
# Builds llama.cpp's llama-bench and llama-server from the source vendored in the PyPI sdist
# llama-cpp-python==0.3.36 (under $WORK, outside the repo; cmake comes from PyPI too), then:
#   1. single sequence: `llama-bench -p 512 -n 128` vs `nextoken bench --pp 512 --tg 128`;
#   2. 16 concurrent streams (153-token prompts, 128 new tokens each, EOS ignored) against
#      `llama-server -np 16` and `nextoken serve`, through the same HTTP client
#      (`nextoken bench --url`), with each server's peak RSS;
# each $RUNS times, and prints the medians and the ratios against the CPU-speed targets.
# Not part of CI: it compiles llama.cpp and keeps both cores busy for minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
WORK=${WORK:-/tmp/nextoken-vs-llamacpp}
MODEL=${MODEL:-$REPO/models/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${THREADS:-$(nproc)}
RUNS=${RUNS:-3}
CONC=${CONC:-16}
# The same KV capacity as llama-server's context below (CONC × 512 tokens): the Q4_1 model's
# cache is f16 in both servers, 30 layers × 192 × 2 × 2 bytes = 23,040 bytes per token.
KV_MB=${KV_MB:-$((CONC * 512 * 23040 / 1048576))}
mkdir -p "$WORK"
./models/fetch-default.sh

LLAMA=$WORK/build/bin
if [ ! -x "$LLAMA/llama-server" ] || [ ! -x "$LLAMA/llama-bench" ]; then
  echo "== building llama.cpp (llama-cpp-python 0.3.36 sdist)"
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q cmake
  # The sdist itself, from PyPI's simple index (`pip download` would build its metadata,
  # compiling cmake from source on the way).
  SDIST=llama_cpp_python-0.3.36.tar.gz
  SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
  if [ ! -f "$WORK/$SDIST" ]; then
    HREF=$(curl -sf https://pypi.org/simple/llama-cpp-python/ | grep -o "https://[^\"#]*/$SDIST" | head -1)
    curl -sfL -o "$WORK/$SDIST" "$HREF"
  fi
  echo "$SHA  $WORK/$SDIST" | sha256sum -c --quiet
  tar -xzf "$WORK"/llama_cpp_python-0.3.36.tar.gz -C "$WORK"
  SRC=$WORK/llama_cpp_python-0.3.36/vendor/llama.cpp
  "$WORK/venv/bin/cmake" -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >/dev/null
  "$WORK/venv/bin/cmake" --build "$WORK/build" --target llama-bench llama-server -j "$(nproc)" >/dev/null
fi
echo "== building nextoken"
cargo build --release --quiet
NT=$REPO/target/release/nextoken
OUT=$WORK/results
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== single sequence: llama-bench pp512/tg128 vs nextoken bench --pp 512 --tg 128"
"$LLAMA/llama-bench" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -r "$RUNS" -o json >"$OUT/llama-bench.json"
"$NT" bench --model "$MODEL" --pp 512 --tg 128 --repetitions "$RUNS" >"$OUT/nextoken-pp-tg.json"

wait_ready() { # url
  for _ in $(seq 1 120); do
    if curl -sf "$1/health" >/dev/null 2>&1 || curl -sf "$1/v1/models" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "server at $1 did not come up" >&2
  return 1
}

load() { # name url pid
  for r in $(seq 1 "$RUNS"); do
    "$NT" bench --url "$2" --concurrency "$CONC" --prompt-tokens 153 --new-tokens 128 \
      --server-pid "$3" --prompt-seed "$r" >>"$OUT/$1-server.jsonl"
  done
}

echo "== $CONC concurrent streams: llama-server -np $CONC"
"$LLAMA/llama-server" -m "$MODEL" -t "$THREADS" -np "$CONC" -c $((CONC * 512)) \
  --host 127.0.0.1 --port 8091 >"$OUT/llama-server.log" 2>&1 &
LPID=$!
trap 'kill $LPID 2>/dev/null || true' EXIT
wait_ready http://127.0.0.1:8091
load llama http://127.0.0.1:8091 "$LPID"
kill "$LPID"; wait "$LPID" 2>/dev/null || true

echo "== $CONC concurrent streams: nextoken serve"
"$NT" serve --model "$MODEL" --host 127.0.0.1 --port 8092 --no-training --kv-cache-mb "$KV_MB" \
  --data-dir "$WORK/data" >"$OUT/nextoken-server.log" 2>&1 &
NPID=$!
trap 'kill $NPID 2>/dev/null || true' EXIT
wait_ready http://127.0.0.1:8092
load nextoken http://127.0.0.1:8092 "$NPID"
kill "$NPID"; wait "$NPID" 2>/dev/null || true

python3 - "$OUT" <<'EOF'
import json, statistics, sys
out = sys.argv[1]
lb = json.load(open(f"{out}/llama-bench.json"))
ll_pp = statistics.median([t["avg_ts"] for t in lb if t["n_prompt"] > 0 and t["n_gen"] == 0])
ll_tg = statistics.median([t["avg_ts"] for t in lb if t["n_gen"] > 0 and t["n_prompt"] == 0])
nt = json.loads(open(f"{out}/nextoken-pp-tg.json").read().strip().splitlines()[-1])
def server(name):
    rows = [json.loads(l) for l in open(f"{out}/{name}-server.jsonl")]
    med = lambda k: statistics.median([r[k] for r in rows])
    return med("agg_tok_s"), med("ttft_ms_p50"), max(r["peak_rss_mb"] or 0 for r in rows)
l_agg, l_ttft, l_rss = server("llama")
n_agg, n_ttft, n_rss = server("nextoken")
rows = [
    ("decode tok/s (tg128)", nt["decode_tok_s"], ll_tg, nt["decode_tok_s"] / ll_tg, ">= 1.2x", nt["decode_tok_s"] / ll_tg >= 1.2),
    ("prefill tok/s (pp512)", nt["prefill_tok_s"], ll_pp, nt["prefill_tok_s"] / ll_pp, ">= 1.5x", nt["prefill_tok_s"] / ll_pp >= 1.5),
    ("aggregate tok/s, 16 streams", n_agg, l_agg, n_agg / l_agg, ">= 3x", n_agg / l_agg >= 3),
    ("TTFT p50 ms, 16 streams", n_ttft, l_ttft, n_ttft / l_ttft, "<= 1/3", n_ttft / l_ttft <= 1 / 3),
    ("peak RSS MiB, 16 streams", n_rss, l_rss, n_rss / l_rss if l_rss else float("nan"), "<= 1x", n_rss <= l_rss),
]
print(f"{'metric':30} {'nextoken':>10} {'llama.cpp':>10} {'ratio':>7}  target   met")
for name, a, b, r, target, met in rows:
    print(f"{name:30} {a:10.1f} {b:10.1f} {r:7.2f}  {target:7}  {'yes' if met else 'no'}")
EOF
