"""The same GPT in PyTorch, written as a researcher would (nanoGPT's shape): eager, or torch.compile on GPU."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.sizes import Size


class Block(nn.Module):
    def __init__(self, s: Size):
        super().__init__()
        d = s.d_model
        self.n_head = s.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=s.bias), nn.LayerNorm(d, bias=s.bias)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=s.bias), nn.Linear(d, d, bias=s.bias)
        self.fc, self.fc2 = nn.Linear(d, 4 * d, bias=s.bias), nn.Linear(4 * d, d, bias=s.bias)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, s: Size):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(s.vocab, s.d_model), nn.Embedding(s.seq_len, s.d_model)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.d_model, bias=s.bias)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * s.n_layer) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied embeddings


def make_step(size: Size, device: str, compile: bool):
    model = GPT(size).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), fused=device == "cuda")
    fwd = torch.compile(model) if compile else model
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=size.bf16)

    def step(x, y):
        with amp:
            logits = fwd(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step
