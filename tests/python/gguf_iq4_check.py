"""llama.cpp's own GGUF reader (the `gguf` Python package) reads an IQ4 file that nextoken
wrote to the same values nextoken reads from it.

Usage: python gguf_iq4_check.py FILE.gguf F32_FOLDER
FILE.gguf: `nextoken convert --quant iq4_xs` of a llama-architecture folder; F32_FOLDER: that
file converted back by nextoken (`convert --dtype f32`: its weights as nextoken dequantizes
them). Every tensor but Q/K (whose rows llama.cpp permutes) is compared bit for bit.
"""
import json
import struct
import sys

import numpy as np
from gguf import GGUFReader
from gguf import quants

gguf_path, folder = sys.argv[1], sys.argv[2]


def safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            assert info["dtype"] == "F32", (name, info["dtype"])
            start, end = info["data_offsets"]
            f.seek(base + start)
            out[name] = np.frombuffer(f.read(end - start), dtype=np.float32).reshape(info["shape"])
        return out


HF = {
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
ours = safetensors(f"{folder}/model.safetensors")
seen = {}
for t in GGUFReader(gguf_path).tensors:
    parts = t.name.split(".")
    if t.name == "token_embd.weight":
        hf = "model.embed_tokens.weight"
    elif t.name == "output_norm.weight":
        hf = "model.norm.weight"
    elif parts[0] == "blk" and parts[2] in HF:
        hf = f"model.layers.{parts[1]}.{HF[parts[2]]}.weight"
    else:
        continue
    want = ours[hf]
    got = quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (t.name, t.tensor_type.name)
    seen[t.tensor_type.name] = seen.get(t.tensor_type.name, 0) + 1
assert seen.get("IQ4_NL", 0) > 0 and seen.get("IQ4_XS", 0) > 0, seen
print("gguf-py reads as nextoken does:", seen)
