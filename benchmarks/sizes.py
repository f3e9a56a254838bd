"""The model sizes every benchmark arm shares, so that each arm trains exactly the same model on the same batch."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    batch: int
    vocab: int
    bf16: bool
    bias: bool = True


SIZES = {
    # nanoGPT's CPU configuration of shakespeare_char (fp32)
    "cpu": Size(n_layer=4, n_head=4, d_model=128, seq_len=64, batch=12, vocab=65, bf16=False),
    # GPT-2 124M as in +exp=gpt2_124m (bf16 compute, no biases, vocab padded to 50304)
    "gpt2": Size(n_layer=12, n_head=12, d_model=768, seq_len=1024, batch=16, vocab=50304, bf16=True, bias=False),
    # the GPU script's arms at a size a CPU runs in seconds
    "tiny": Size(n_layer=2, n_head=2, d_model=64, seq_len=32, batch=4, vocab=256, bf16=True, bias=False),
}


def mlsys_overrides(size: Size) -> list[str]:
    """The experiments.run overrides giving mlsys the same model, optimizer and batch."""
    return [
        "+exp=shakespeare_char" if size == SIZES["cpu"] else "+exp=gpt2_124m",
        f"model.n_layer={size.n_layer}", f"model.n_head={size.n_head}", f"model.d_model={size.d_model}",
        f"model.block_size={size.seq_len}", f"model.bias={str(size.bias).lower()}",
        f"model.dtype={'bfloat16' if size.bf16 else 'float32'}", "model.vocab_multiple=1",
        f"data.seq_len={size.seq_len}", f"data.batch_size={size.batch}", "logger=jsonl", "trainer.compile_cache=",
        "optim.b2=0.99", "optim.weight_decay=0.1", "optim.clip_norm=1.0", "optim.warmup_steps=0",
    ] + ([] if size == SIZES["cpu"] else [f"model.vocab_size={size.vocab}", f"data.vocab_size={size.vocab}"])
