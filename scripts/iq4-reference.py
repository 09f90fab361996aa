#!/usr/bin/env python3
"""Writes tests/reference/iq4.json: random IQ4_NL and IQ4_XS blocks (as GGUF stores them) and
their values as llama.cpp's own Python package (`pip install gguf`, `gguf.quants`) dequantizes
them -- an independent implementation to check nextoken's block decoding against."""
import json
import sys

from importlib.metadata import version

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

rng = np.random.default_rng(7)


def blocks(qtype, count, size):
    raw = rng.integers(0, 256, size=(count, size), dtype=np.uint8)
    # A sane f16 scale d in the first two bytes of every block (both signs).
    d = (rng.uniform(0.001, 0.02, size=count) * rng.choice([-1, 1], size=count)).astype(np.float16)
    raw[:, :2] = d.view(np.uint8).reshape(count, 2)
    values = quants.dequantize(raw.reshape(-1), qtype)
    return {"hex": raw.tobytes().hex(), "values": [float(v) for v in values.reshape(-1)]}


out = {
    "source": "gguf (llama.cpp gguf-py) " + version("gguf") + ": gguf.quants.dequantize",
    "IQ4_NL": blocks(T.IQ4_NL, 4, 18),
    "IQ4_XS": blocks(T.IQ4_XS, 2, 136),
}
path = sys.argv[1] if len(sys.argv) > 1 else "tests/reference/iq4.json"
with open(path, "w") as f:
    json.dump(out, f)
    f.write("\n")
