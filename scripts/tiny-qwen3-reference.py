#!/usr/bin/env python3
"""Makes tests/reference/tiny/qwen3/ (a tiny random Qwen3 saved by transformers) and
tests/reference/tiny/qwen3.json (transformers' float32 logits for it), in the layout of the
shared tiny_models.json, for tests/tiny_models.rs. Not part of CI.

Needs torch and transformers (>= 4.51, which has Qwen3) from PyPI:
    python3 -m venv /tmp/q3venv && /tmp/q3venv/bin/pip install torch transformers safetensors
    /tmp/q3venv/bin/python scripts/tiny-qwen3-reference.py

The weights are drawn wider than transformers' initialisation (std 0.1 instead of 0.02, the
q/k norm multipliers 1 ± 0.3 instead of ones) so that the per-head q/k norms, which the
other architectures lack, move the logits well beyond the test's tolerance if skipped or
applied to the wrong axis. head_dim (32) is not hidden_size / heads (64 / 4), as in the real
Qwen3 models (1024 wide, 16 heads of 128).
"""
import json
import os
import sys

import torch
import transformers
from transformers import Qwen3Config, Qwen3ForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference", "tiny")
CASES = [
    [1, 17, 42, 99, 5, 200, 3, 77, 31, 250, 12, 64],
    [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22],
    [7, 7, 7, 7, 7],
]


def main():
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    model = Qwen3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    folder = os.path.join(OUT, "qwen3")
    model.save_pretrained(folder, safe_serialization=True)
    cases = []
    with torch.no_grad():
        for ids in CASES:
            x = torch.tensor([ids])
            logits = model(x).logits[0]
            top2 = logits.topk(2, dim=-1).values
            greedy = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=8,
                min_new_tokens=8,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(ids):]
            cases.append(
                {
                    "input_ids": ids,
                    "last_logits": [round(v, 6) for v in logits[-1].tolist()],
                    "argmax_per_position": logits.argmax(-1).tolist(),
                    "greedy8": greedy.tolist(),
                    "min_top1_top2_margin": round(float((top2[:, 0] - top2[:, 1]).min()), 5),
                }
            )
    doc = {
        "schema": "as tiny_models.json (the shared reference); made by scripts/tiny-qwen3-reference.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "models": {"qwen3": {"dir": "qwen3", "architecture": "Qwen3ForCausalLM", "cases": cases}},
    }
    with open(os.path.join(OUT, "qwen3.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print("wrote", folder, "and qwen3.json", file=sys.stderr)


if __name__ == "__main__":
    main()
