"""Serve an export over HTTP: python -m experiments.serve model=<export dir> [serve.port=8000 serve.max_batch=64
serve.max_delay_ms=10 serve.api_keys_file=<digests> ...]; API keys from MLSYS_API_KEYS or serve.api_keys_file.
`python -m experiments.serve keygen` prints a new API key and the sha256 digest to put in the keys file."""

import sys

from mlsys.cli import friendly_errors, key_values


@friendly_errors
def main(argv: list[str]) -> None:
    from mlsys.serve.config import ARGS

    if argv == ["keygen"]:
        from mlsys.serve.auth import new_key

        key, digest = new_key()
        print(f"key:    {key}\ndigest: {digest}\n(give the key to the client; put the digest in serve.api_keys_file)")
        return
    from mlsys.serve import from_args, serve

    serve(from_args(key_values(argv, ARGS)))


if __name__ == "__main__":
    main(sys.argv[1:])
