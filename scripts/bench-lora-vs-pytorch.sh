#!/usr/bin/env bash
# nextoken's LoRA trainer against PyTorch + PEFT on the same CPU, in one run (issue 7's speed
# target): one optimizer step (r = 8, alpha = 16, q_proj + v_proj, AdamW lr 1e-3) on
# SmolLM2-135M-Instruct, batch 4 random-id sequences × 128 tokens, loss over all tokens, median
# of 5 steps after a warm-up, 2 threads each. PyTorch trains the GGUF dequantized to f32
# (transformers' GGUF loader), the workload of ../shared/reference/lora_speed.json.
# Installs torch, transformers, peft and gguf from PyPI into $WORK (outside the repo; the
# Linux torch wheels bring the CUDA libraries: ~4 GB). Not part of CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
WORK=${WORK:-/tmp/nextoken-vs-pytorch}
MODEL=${MODEL:-$REPO/models/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${THREADS:-2}
mkdir -p "$WORK"
./models/fetch-default.sh
if [ ! -x "$WORK/venv/bin/python" ] || ! "$WORK/venv/bin/python" -c "import torch, peft, transformers, gguf" 2>/dev/null; then
  echo "== installing torch, transformers, peft, gguf (PyPI)"
  python3 -m venv "$WORK/venv"
  "$WORK/venv/bin/pip" install -q torch transformers peft gguf
fi
echo "== building nextoken"
cargo build --release --quiet
echo "== PyTorch + PEFT"
OMP_NUM_THREADS=$THREADS "$WORK/venv/bin/python" - "$MODEL" "$THREADS" >"$WORK/pytorch.json" <<'PY'
import json, os, statistics, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

path, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path), torch_dtype=torch.float32,
    attn_implementation="sdpa")
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                         target_modules=["q_proj", "v_proj"]))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
vocab = model.config.vocab_size
times = []
for step in range(6):
    ids = torch.randint(100, vocab, (4, 128))
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step > 0:
        times.append(time.perf_counter() - start)
print(json.dumps({"torch": torch.__version__, "median_s_per_step": statistics.median(times),
                  "steps": times}))
PY
echo "== nextoken"
"$REPO/target/release/nextoken" bench --model "$MODEL" --scenario lora >"$WORK/nextoken.json"
python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
pt = json.loads(open(f"{w}/pytorch.json").read().strip().splitlines()[-1])
nt = json.loads(open(f"{w}/nextoken.json").read().strip().splitlines()[-1])
a, b = nt["median_s_per_step"], pt["median_s_per_step"]
print(f"LoRA step, batch 4 x 128 (s): nextoken {a:.3f}  PyTorch {pt['torch']} {b:.3f}  "
      f"ratio {a / b:.2f}  target <= 1  {'met' if a <= b else 'not met'}")
PY
