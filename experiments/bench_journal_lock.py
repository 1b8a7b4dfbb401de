"""One acquire + release of a study journal's lock: gradhpo's OwnedFileLock against Optuna's
own journal locks (symlink, the default of JournalFileBackend on POSIX, and open/O_EXCL), on
one journal in a fresh directory, interleaved, median of ``--rounds`` rounds of ``--n``
cycles each. A journal append takes the lock once, a trivial trial about four times.

    python experiments/bench_journal_lock.py --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from optuna.storages.journal import JournalFileOpenLock, JournalFileSymlinkLock

from gradhpo.search.journal_lock import OwnedFileLock


def cycle_us(lock: Any, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        lock.acquire()
        lock.release()
    return (time.perf_counter() - start) / n * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=5000, help="cycles per round")
    args = parser.parse_args(argv)
    journal = Path(tempfile.mkdtemp()) / "study.journal"
    journal.touch()
    locks = {
        "gradhpo OwnedFileLock": OwnedFileLock(journal),
        "optuna JournalFileSymlinkLock": JournalFileSymlinkLock(str(journal)),
        "optuna JournalFileOpenLock": JournalFileOpenLock(str(journal)),
    }
    times: dict[str, list[float]] = {name: [] for name in locks}
    for _ in range(args.rounds):
        for name, lock in locks.items():
            times[name].append(cycle_us(lock, args.n))
    print(f"{platform.machine()}, {platform.python_version()}, {args.rounds} rounds x {args.n}")
    base = statistics.median(times["optuna JournalFileSymlinkLock"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:32s} {median:6.1f} us per acquire+release ({median / base:.2f}x symlink)")


if __name__ == "__main__":
    main()
