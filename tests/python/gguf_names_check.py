"""A GGUF file nextoken wrote from a Hugging Face folder names its architecture, tensors and
metadata keys as llama.cpp does (its `gguf` Python package: the architecture names, the
HF → GGUF tensor name map its converter uses, the metadata key templates).

Usage: python gguf_names_check.py FILE.gguf HF_FOLDER
Every tensor of the folder's safetensors maps (llama.cpp's map for the file's architecture)
to a tensor of the file and every tensor of the file comes from one (llama.cpp's
`rope_freqs.weight`, which has no HF tensor, aside); every `<arch>.` key is one of llama.cpp's
(but for nextoken's three keys of values llama.cpp derives, below).
"""
import glob
import inspect
import json
import os
import struct
import sys

import gguf
from gguf import GGUFReader

gguf_path, folder = sys.argv[1], sys.argv[2]
reader = GGUFReader(gguf_path)


def field(name):
    f = reader.fields[name]
    return f.parts[f.data[0]]


arch_name = bytes(field("general.architecture")).decode()
arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
assert arch is not None, f"llama.cpp has no architecture named {arch_name!r}"
blocks = int(field(f"{arch_name}.block_count")[0])

hf_names = []
for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hf_names += [k for k in json.loads(f.read(n)) if k != "__metadata__"]
name_map = gguf.get_tensor_name_map(arch, blocks)
expected = {}
for hf in hf_names:
    mapped = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
    assert mapped is not None, f"llama.cpp maps no {arch_name} tensor from {hf}"
    expected[mapped] = hf
ours = {t.name for t in reader.tensors} - {"rope_freqs.weight"}
missing = sorted(set(expected) - ours)
extra = sorted(ours - set(expected))
assert not missing, f"{arch_name}: llama.cpp would write {missing}, the file lacks them"
assert not extra, f"{arch_name}: the file has {extra}, which llama.cpp maps from no HF tensor"

templates = set()


def walk(cls):
    for value in vars(cls).values():
        if inspect.isclass(value):
            walk(value)
        elif isinstance(value, str) and "{arch}" in value:
            templates.add(value.replace("{arch}", arch_name))


walk(gguf.Keys)
# nextoken's own keys, for values llama.cpp keeps elsewhere or derives, so that converting
# back gives the folder's config (llama.cpp ignores keys it does not know): Llama 3 rope
# scaling's parameters beside `rope_freqs.weight` (which is written too), and Gemma 2's
# `query_pre_attn_scalar` (llama.cpp derives it from the model size).
templates |= {
    f"{arch_name}.rope.scaling.low_freq_factor",
    f"{arch_name}.rope.scaling.high_freq_factor",
    f"{arch_name}.attention.query_pre_attn_scalar",
}
unknown = sorted(k for k in reader.fields if k.startswith(arch_name + ".") and k not in templates)
assert not unknown, f"keys llama.cpp does not know: {unknown}"
print(f"{arch_name}: {len(ours)} tensors and {len(reader.fields)} keys as llama.cpp names them")
