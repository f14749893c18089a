"""How long the real tapdisk takes to answer a pause under guest write load (docs/xen.md, "Two
upstream tapdisk behaviours"): ``python -m testxen.pause_rate MODE N [--snap]``.

One real tapdisk (testxen.blktap) on a new 512 MiB VHD, its guest (testxen/guest.py) writing a
record into each of 256 blocks in turn without pause; N times: pause, wait until paused,
(``--snap``: a new leaf, so that every write allocates a block again), unpause, 50 ms. MODE
``raw``: plain ``tap-ctl pause``; ``livesnap``: livesnap.tools.tap_ctl.pause (nudged). Prints
the distribution of the pause times; a pause unanswered after ``--cap`` seconds counts as such
(its tap-ctl is killed, and a ``tap-ctl list`` gets the pause answered before the unpause)."""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from testxen import blktap


def main(argv=None):
    p = argparse.ArgumentParser(prog="testxen.pause_rate")
    p.add_argument("mode", choices=("raw", "livesnap"))
    p.add_argument("n", type=int)
    p.add_argument("--snap", action="store_true")
    p.add_argument("--cap", type=float, default=30.0)
    a = p.parse_args(argv)
    os.environ.update(blktap.env())
    from livesnap.tools import tap_ctl

    work = tempfile.mkdtemp(prefix="pause-rate-")
    leaf = os.path.join(work, "d0.vhd")
    blktap.create(leaf, 512 << 20)
    tds = blktap.Tapdisks(work, slots=256, stride=2 << 20, interval=0)
    pid, minor = tds.create(leaf)
    tds.wait_acks(pid, minor, 5)
    times = []
    try:
        for i in range(a.n):
            t0 = time.monotonic()
            if a.mode == "raw":
                proc = subprocess.Popen([blktap.tap_ctl_bin(), "pause", "-p", str(pid),
                                         "-m", str(minor)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                try:
                    proc.wait(a.cap)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            else:
                try:
                    tap_ctl.pause(pid, minor, timeout=a.cap)
                except tap_ctl.PauseTimeout:
                    pass
            times.append(time.monotonic() - t0)
            for _ in range(200):
                if tap_ctl.get(pid, minor).state & tap_ctl.PAUSED:
                    break
                time.sleep(0.05)
            if a.snap:
                new = os.path.join(work, "d%d.vhd" % (i + 1))
                rc, out, err = blktap.vhd_util("snapshot", "-n", new, "-p", leaf)
                assert rc == 0, (out, err)
                leaf = new
            rc, out, err = blktap.tap_ctl("unpause", "-p", pid, "-m", minor, "-a", "vhd:" + leaf)
            assert rc == 0, (out, err)
            time.sleep(0.05)
    finally:
        tds.close()
        subprocess.run(["rm", "-rf", work])
    times.sort()
    print("%s%s n=%d: median %.3f s, p90 %.3f s, max %.3f s; over 0.5 s: %d, over 1 s: %d, "
          "unanswered after %g s: %d" % (
              a.mode, " --snap" if a.snap else "", len(times), statistics.median(times),
              times[int(len(times) * 0.9)], times[-1], sum(t > 0.5 for t in times),
              sum(t > 1 for t in times), a.cap, sum(t >= a.cap for t in times)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
