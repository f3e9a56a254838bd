"""Try multi-host on one machine: python -m experiments.launch_local -n 2 [-d 4] -- +exp=digits_mlp mesh=data"""

import argparse
import sys

from mlsys.launch import launch_local

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--processes", type=int, default=2)
    parser.add_argument("-d", "--devices-per-process", type=int, default=4, help="simulated CPU devices each")
    parser.add_argument("overrides", nargs="*", help="after --: the experiments.run arguments")
    a = parser.parse_args()
    sys.exit(launch_local(a.processes, a.devices_per_process, a.overrides))
