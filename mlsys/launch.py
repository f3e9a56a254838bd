"""Start N local processes of one multi-host run, so that anyone can try multi-host on one machine."""

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(n: int, devices_per_process: int, args: list[str], module: str = "experiments.run") -> int:
    """Run `python -m module args` as processes 0..n-1 joined at 127.0.0.1, each with its own CPU devices.
    Process 0's output is shown; every process's is also kept in a log beside the run. Returns the first non-zero
    exit code, or 0. If one process fails, the others are stopped (they would wait for it forever)."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", module, *args, f"dist.num_processes={n}", f"dist.process_id={i}",
               f"dist.coordinator=127.0.0.1:{port}"]
        out = None if i == 0 else subprocess.DEVNULL
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=None if i == 0 else subprocess.PIPE))
    code = 0
    try:
        while procs and any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                code = failed[0].returncode
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                break
            time.sleep(0.2)
        for i, p in enumerate(procs):
            p.wait()
            if p.returncode and not code:
                code = p.returncode
            if i and p.returncode and p.stderr is not None:
                tail = p.stderr.read().decode(errors="replace").strip().splitlines()[-5:]
                print(f"[process {i}] exited with {p.returncode}:\n" + "\n".join(tail), file=sys.stderr)
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        raise
    return code
