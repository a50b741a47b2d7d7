"""Run the featcache CLI and write this process's peak resident memory (VmHWM, bytes) to $PEAK_RSS_FILE.

A forked child's rusage also counts its parent's memory at fork time, so a big benchmark process
would inflate every child's figure; VmHWM belongs to the exec'd process alone (worker processes it
starts, e.g. to read a streamed cache, have their own, read from their /proc/<pid>/status).
"""

import atexit
import os
import sys


def _report():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["PEAK_RSS_FILE"], "w") as f:
        f.write(str(kib * 1024))


if __name__ == "__main__":   # guarded: processes started by spawning import this file again
    atexit.register(_report)
    sys.argv[0] = "featcache"
    from featcache.cli import main

    main()
