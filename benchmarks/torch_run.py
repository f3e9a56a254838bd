"""A hand-written PyTorch run of `+exp=shakespeare_char`'s schedule, doing the same work as mlsys's run: the same
GPT (benchmarks/handwritten_torch.py), character-level tiny Shakespeare with the last 10% held out, AdamW with
lr 1e-3 warmed up over 100 steps then cosine to 1e-4, clipping at 1.0, batch 12 x 64; every 500 steps an
evaluation on 200 held-out batches and a checkpoint (model and optimizer state); a final evaluation, a final
checkpoint and a 200-character sample. The whole-run arm (benchmarks/arm.py) times it against
`python -m experiments.run +exp=shakespeare_char`, each in its own process.

    python -m benchmarks.torch_run --steps 2000 --out /tmp/torch_run
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import handwritten_torch as hw
from benchmarks.sizes import Size

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mlsys", "assets",
                      "tinyshakespeare.txt")


def lr_at(step: int, steps: int, lr=1e-3, min_lr=1e-4, warmup=100) -> float:
    """The preset's schedule: linear warm-up from 0, then cosine from lr to min_lr over the remaining steps."""
    if step < warmup:
        return lr * step / warmup
    t = min(step - warmup, max(steps - warmup, 1)) / max(steps - warmup, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-batches", type=int, default=200)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--out", required=True, help="directory for the checkpoints")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    text = open(CORPUS, encoding="utf-8").read()
    chars = sorted(set(text))
    lut = np.zeros(256, np.int64)  # the corpus is ASCII: byte -> index of its character in the sorted set
    lut[[ord(c) for c in chars]] = np.arange(len(chars))
    data = torch.from_numpy(lut[np.frombuffer(text.encode("ascii"), np.uint8)])
    cut = len(data) - int(len(data) * 0.1)
    train, val = data[:cut], data[cut:]
    size = Size(n_layer=a.n_layer, n_head=4, d_model=a.d_model, seq_len=64, batch=12, vocab=len(chars), bf16=False)
    model = hw.GPT(size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(0)

    def batch(split, n=size.batch):
        i = torch.randint(len(split) - size.seq_len - 1, (n,), generator=gen)
        x = torch.stack([split[j:j + size.seq_len] for j in i.tolist()])
        y = torch.stack([split[j + 1:j + 1 + size.seq_len] for j in i.tolist()])
        return x, y

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = [F.cross_entropy(model(x).view(-1, size.vocab), y.view(-1)).item()
                  for x, y in (batch(val) for _ in range(a.eval_batches))]
        model.train()
        return float(np.mean(losses))

    def save(step):
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step},
                   os.path.join(a.out, f"ckpt_{step}.pt"))

    os.makedirs(a.out, exist_ok=True)
    evals, loss = {}, None
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps)
        x, y = batch(train)
        loss = F.cross_entropy(model(x).view(-1, size.vocab), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % a.eval_every == 0 or done == a.steps:
            evals[done] = evaluate()
            save(done)
    with torch.no_grad():  # a 200-character sample continuing a newline
        model.eval()
        idx = torch.tensor([[chars.index("\n")]])
        for _ in range(200):
            logits = model(idx[:, -size.seq_len:])[:, -1]
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, -1), 1, generator=gen)], 1)
    sample = "".join(chars[i] for i in idx[0].tolist())
    return {"train_loss": float(loss), "val": evals, "sample": sample, "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
