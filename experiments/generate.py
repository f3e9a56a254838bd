"""Continue a prompt with a trained language model (KV-cache decoding, mlsys.generate):
python -m experiments.generate run=<run dir> prompt="ROMEO:" [max_new_tokens=200] [temperature=0.8] [top_k=0]
[top_p=1.0] [seed=0] [step=N]. temperature=0 is greedy."""

import os
import sys

from mlsys.cli import friendly_errors, key_values
from mlsys.errors import ConfigError

ARGS = {"run": "a run dir", "prompt": "the text to continue", "max_new_tokens": "tokens to add (200)",
        "temperature": "0 = greedy (1.0)", "top_k": "0 = all tokens (0)", "top_p": "nucleus mass, 1 = off (1.0)",
        "seed": "sampling seed (0)", "step": "a checkpoint step (default: the latest)"}


def number(a: dict, key: str, kind, default):
    try:
        return kind(a.get(key, default))
    except ValueError:
        raise ConfigError(f"{key}={a[key]!r}: must be a {kind.__name__}, e.g. {key}={default}") from None


@friendly_errors
def main(argv: list[str]) -> None:
    a = key_values(argv, ARGS)
    if "run" not in a or "prompt" not in a:
        raise ConfigError('run=<run dir> and prompt="..." are required, e.g. python -m experiments.generate '
                          'run=runs/shakespeare_char/<time> prompt="ROMEO:"')
    from mlsys.config import load_saved
    from mlsys.export.restore import load_run
    from mlsys.generate import complete
    from mlsys.models import family_of

    saved = load_saved(a["run"]) if os.path.isdir(a["run"]) else None
    if saved is not None and saved.data.name == "synthetic":  # said before any weights are restored
        cfg = saved
        raise ConfigError(f"run={a['run']!r} trained model={cfg.model.name} on data=synthetic (random token ids): it "
                          f"has no tokenizer to turn a prompt into ids. A Hugging Face folder imported without its "
                          f"tokenizer.json gives such a run: put the model's tokenizer.json in that folder and import "
                          f"it again (python -m experiments.import_hf <folder>)")
    run = load_run(a["run"], number(a, "step", int, 0) or None)
    if run.dataset.tokenizer is None:
        raise ConfigError(f"run={a['run']!r} trained model={run.cfg.model.name} on data={run.cfg.data.name}, not a "
                          f"language model on text; give a run of a language model")
    text = complete(run.model, run.dataset.tokenizer, a["prompt"], number(a, "max_new_tokens", int, 200),
                    seed=number(a, "seed", int, 0), temperature=number(a, "temperature", float, 1.0),
                    top_k=number(a, "top_k", int, 0), top_p=number(a, "top_p", float, 1.0),
                    block_size=family_of(run.cfg.model).max_len(run.cfg.model) or run.cfg.data.seq_len)
    print(a["prompt"] + text)


if __name__ == "__main__":
    main(sys.argv[1:])
