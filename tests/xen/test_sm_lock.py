"""SM's SR lock: livesnap waits while SM holds it and gives up with Busy after its timeout."""
import multiprocessing
import os
import time

import pytest

from livesnap.errors import Busy
from livesnap.platforms.sm_lock import sr_lock


def _hold(base, sr, seconds, ready):
    import fcntl
    os.makedirs(os.path.join(base, sr), exist_ok=True)
    with open(os.path.join(base, sr, "sr"), "w+") as f:     # as SM opens it
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX)
        ready.set()
        time.sleep(seconds)


def test_waits_for_sm_then_takes_the_lock(tmp_path):
    ready = multiprocessing.Event()
    p = multiprocessing.Process(target=_hold, args=(str(tmp_path), "sr1", 0.5, ready))
    p.start()
    ready.wait(5)
    t0 = time.monotonic()
    with sr_lock("sr1", base_dir=str(tmp_path), timeout=5) as path:
        waited = time.monotonic() - t0
        assert path == os.path.join(str(tmp_path), "sr1", "sr")
    p.join()
    assert waited >= 0.3


def test_gives_up_with_busy(tmp_path):
    ready = multiprocessing.Event()
    p = multiprocessing.Process(target=_hold, args=(str(tmp_path), "sr2", 2, ready))
    p.start()
    ready.wait(5)
    with pytest.raises(Busy):
        with sr_lock("sr2", base_dir=str(tmp_path), timeout=0.3):
            pass
    p.join()
