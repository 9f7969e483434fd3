"""Writes compiler/examples/llama_block.pt2, the model `qcc demo` compiles.

A Llama-style decoder block (hidden 256, 4 heads, SwiGLU 768), seeded, exported
with torch.export for input [1, 32, 256].  Re-run after changing test/models.py.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import models  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "compiler", "examples", "llama_block.pt2")

if __name__ == "__main__":
    model = models.LlamaBlock(hidden=256, heads=4, ffn=768, max_seq=64, seed=0).eval()
    inputs = model.example_inputs(batch=1, seq=32, seed=0)
    torch.export.save(torch.export.export(model, inputs), OUT)
    print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT) / 1e6:.1f} MB)")
