"""Print the package sources pip is configured with (pip.conf files and PIP_* variables: find-links, index URLs,
constraint files) as uv arguments, one per line: uv reads none of pip's configuration, and `make install` must
resolve the same wheels with either tool (for example a CPU-only torch from a local folder)."""

import subprocess
import sys

FLAGS = {"find-links": "--find-links", "extra-index-url": "--extra-index-url", "index-url": "--index-url",
         "constraint": "--constraint"}


def main() -> None:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    args: list[str] = []
    index_url = None
    for line in listed.splitlines():  # e.g. global.find-links='/opt/wheels a/b', :env:.find-links='...'
        key, _, value = line.partition("=")
        key, value = key.rsplit(".", 1)[-1], value.strip("'\"")
        if key == "index-url":  # one index; the last listed (env, then site) wins, as in pip
            index_url = value
        elif key in FLAGS:
            for v in value.split():
                if v not in args:
                    args += [FLAGS[key], v]
    if index_url:
        args += ["--index-url", index_url]
    # pip picks the best version across every index; uv by default stops at the first index that has the package
    print("\n".join([*args, "--index-strategy", "unsafe-best-match"]))


if __name__ == "__main__":
    main()
