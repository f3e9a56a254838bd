"""Check an export folder: python -m experiments.verify <export dir> [public_key=<trusted key.pem>]"""

import sys

from mlsys.cli import friendly_errors, key_values
from mlsys.errors import ConfigError


@friendly_errors
def main(argv: list[str]) -> None:
    if not argv:
        raise ConfigError("usage: python -m experiments.verify <export dir> [public_key=<trusted key.pem>]")
    from mlsys.export.manifest import verify

    opts = key_values(argv[1:], {"public_key": "a PEM public key you trust"})
    manifest = verify(argv[0], opts.get("public_key"))
    print(f"ok: {len(manifest['files'])} files match the signed manifest ({argv[0]})")


if __name__ == "__main__":
    main(sys.argv[1:])
