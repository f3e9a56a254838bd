"""Report on a run or a sweep: python -m experiments.report <run or sweep dir> [metric=val.loss] [mode=min|max|last]
[out=…]. Without metric/mode, the objective the runs were trained for (their sweep.objective, sweep.mode)."""

import sys

from mlsys.cli import friendly_errors, key_values
from mlsys.errors import ConfigError


@friendly_errors
def main(argv: list[str]) -> None:
    if not argv:
        raise ConfigError("usage: python -m experiments.report <run or sweep dir> [metric=val.loss] [mode=min]")
    from mlsys.report import write_report

    opts = key_values(argv[1:], {"metric": "<split>.<name>, e.g. val.accuracy", "mode": "min, max or last",
                                 "out": "where to write (default: the dir itself)"})
    print(f"report: {write_report(argv[0], opts.get('metric'), opts.get('mode'), opts.get('out'))}")


if __name__ == "__main__":
    main(sys.argv[1:])
