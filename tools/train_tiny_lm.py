"""Trains the tiny byte-level language model that qcc's accuracy report measures.

    python -m qcc.tools.train_tiny_lm [--minutes 8] [--out test/data]

The model is test/models.py's LlamaModel (vocab 256 = bytes, hidden 256, 2
layers, 4 heads, SwiGLU ffn 768 = 12*64, so the down projection's input has a
Walsh-Hadamard size of the 12*2^k family), trained on the Python standard
library's top-level modules: text every machine with Python has offline.
Every 16th file (sorted by name) is held out; the first 32 KiB of that text is
written next to the checkpoint so that perplexity is measured on the same bytes
everywhere.  Outputs in --out: tiny_lm.safetensors (parameters only, float32),
tiny_lm.json (constructor arguments), tiny_lm_heldout.txt, tiny_lm_train.log.
"""

import argparse
import glob
import json
import math
import os
import sys
import sysconfig
import time

import numpy as np
import torch
import torch.nn.functional as F

CONFIG = dict(vocab=256, hidden=256, layers=2, heads=4, kv_heads=2, ffn=768, max_seq=128, seed=0)
HELDOUT_BYTES = 32 * 1024


def _models():
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(os.path.dirname(here), "test"))
    import models

    return models


def corpus() -> tuple[bytes, bytes]:
    """(train bytes, held-out bytes) from the stdlib's top-level .py files."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if len(files) < 32:
        raise SystemExit(f"train_tiny_lm: only {len(files)} stdlib modules found; need the Python stdlib sources")
    train, held = [], []
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            (held if i % 16 == 7 else train).append(f.read())
    return b"\n".join(train), b"\n".join(held)


def load_model(data_dir: str):
    """The trained LlamaModel (eval mode) from `data_dir`."""
    from safetensors.torch import load_file

    with open(os.path.join(data_dir, "tiny_lm.json")) as f:
        config = json.load(f)
    model = _models().LlamaModel(**config).eval()
    state = load_file(os.path.join(data_dir, "tiny_lm.safetensors"))
    missing = set(dict(model.named_parameters())) - set(state)
    if missing:
        raise ValueError(f"checkpoint lacks parameters: {sorted(missing)}")
    model.load_state_dict(state, strict=False)
    return model


def heldout_sequences(data_dir: str, seq: int, count: int) -> torch.Tensor:
    """`count` non-overlapping byte sequences of length seq+1 from the held-out text."""
    with open(os.path.join(data_dir, "tiny_lm_heldout.txt"), "rb") as f:
        data = np.frombuffer(f.read(), np.uint8)
    if len(data) < count * (seq + 1):
        raise ValueError(f"held-out text has {len(data)} bytes, need {count * (seq + 1)}")
    return torch.from_numpy(data[: count * (seq + 1)].astype(np.int64).reshape(count, seq + 1))


def perplexity_of_logits(logits: torch.Tensor, targets: torch.Tensor) -> float:
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1))
    return math.exp(loss.item())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget")
    p.add_argument("--out", default=os.path.join("test", "data"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; 1 is faster while other work shares the 2 cores")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train_bytes, held_bytes = corpus()
    train = torch.from_numpy(np.frombuffer(train_bytes, np.uint8).astype(np.int64))
    held = torch.from_numpy(np.frombuffer(held_bytes, np.uint8).astype(np.int64))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tiny_lm_heldout.txt"), "wb") as f:
        f.write(held_bytes[:HELDOUT_BYTES])

    model = _models().LlamaModel(**CONFIG)
    seq = CONFIG["max_seq"]
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    log_lines = [f"config {json.dumps(CONFIG)} params {n_params} train_bytes {len(train)} "
                 f"heldout_bytes {len(held)} batch {args.batch}x{seq} lr {args.lr} budget {args.minutes} min "
                 f"threads {args.threads}"]
    print(log_lines[0], flush=True)

    def batch_from(data, n, g):
        starts = torch.randint(0, len(data) - seq - 1, (n,), generator=g)
        chunk = torch.stack([data[s: s + seq + 1] for s in starts.tolist()])
        return chunk[:, :-1], chunk[:, 1:]

    def evaluate(data, batches=8):
        g = torch.Generator().manual_seed(123)
        model.eval()
        total = 0.0
        with torch.no_grad():
            for _ in range(batches):
                x, y = batch_from(data, 16, g)
                total += F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item()
        model.train()
        return math.exp(total / batches)

    budget = args.minutes * 60.0
    warmup = 50
    t0 = time.perf_counter()
    step = 0
    model.train()
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget:
            break
        frac = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch_from(train, args.batch, gen)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            line = f"step {step} time {elapsed:.0f}s lr {lr:.2e} train_loss {loss.item():.4f}"
            log_lines.append(line)
            print(line, flush=True)
    model.eval()
    train_ppl, val_ppl = evaluate(train), evaluate(held)
    final = (f"done steps {step} time {time.perf_counter() - t0:.0f}s train_ppl {train_ppl:.3f} "
             f"val_ppl {val_ppl:.3f} (byte-level, 8 batches of 16x{seq})")
    log_lines.append(final)
    print(final, flush=True)

    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
              os.path.join(args.out, "tiny_lm.safetensors"))
    with open(os.path.join(args.out, "tiny_lm.json"), "w") as f:
        json.dump(CONFIG, f, indent=1, sort_keys=True)
        f.write("\n")
    with open(os.path.join(args.out, "tiny_lm_train.log"), "w") as f:
        f.write("\n".join(log_lines) + "\n")


if __name__ == "__main__":
    main()
