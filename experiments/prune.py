"""Prune a trained run: python -m experiments.prune run=<run dir> sparsity=0.5 [method=magnitude|structured]
[out=<new run dir>]. Then fine-tune with trainer.init_from=<new run dir> (the masks hold the zeros)."""

import sys

from mlsys.cli import friendly_errors, key_values
from mlsys.errors import ConfigError

ARGS = {"run": "a run dir", "sparsity": "the fraction of each prunable kernel set to zero, in [0, 1)",
        "method": "magnitude (smallest |w|) or structured (whole output channels)",
        "out": "the new run dir (default: <run>_pruned<percent>_<method>)"}


@friendly_errors
def main(argv: list[str]) -> None:
    a = key_values(argv, ARGS)
    if "run" not in a or "sparsity" not in a:
        raise ConfigError("run=<run dir> and sparsity=<fraction> are required, e.g. python -m experiments.prune "
                          "run=runs/digits_mlp/<time> sparsity=0.5")
    try:
        sparsity = float(a["sparsity"])
    except ValueError:
        raise ConfigError(f"sparsity={a['sparsity']!r}: must be a number in [0, 1), e.g. sparsity=0.5") from None
    from mlsys.prune import prune_run

    r = prune_run(a["run"], sparsity, a.get("method", "magnitude"), a.get("out"))
    c = r["pruned_weights"]
    print(f"pruned {c['zeros']:,} of {c['weights']:,} weights in {c['kernels']} kernels ({r['method']})")
    for split in r["after"]:
        b, f = r["before"][split], r["after"][split]
        print(f"  {split:<5} accuracy {b['accuracy']:.4f} -> {f['accuracy']:.4f}   loss {b['loss']:.4f} -> "
              f"{f['loss']:.4f}")
    print(f"run dir: {r['run_dir']}  (fine-tune: trainer.init_from={r['run_dir']})")


if __name__ == "__main__":
    main(sys.argv[1:])
