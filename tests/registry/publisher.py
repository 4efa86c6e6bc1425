"""A publishing process for concurrency and crash tests.

    python -m tests.registry.publisher ROOT SRC NAME COUNT [START_FILE]

Waits until START_FILE exists (so several processes start together), publishes SRC
COUNT times as NAME (metrics record pid and round), and prints each `name@N` as it lands.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from loradock.registry import Registry


def main(argv: list[str]) -> int:
    root, src, name, count = argv[:4]
    start = Path(argv[4]) if len(argv) > 4 else None
    deadline = time.monotonic() + 60
    while start is not None and not start.exists():
        if time.monotonic() > deadline:
            return 3
        time.sleep(0.005)
    registry = Registry(root)
    for i in range(int(count)):
        v = registry.publish(src, name, metadata={"metrics": {"pid": os.getpid(), "round": i}})
        print(v.ref, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
