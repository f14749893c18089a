"""bench/xen.py's tap-ctl: the real one (scripts/build-blktap.sh, testxen/blktap.py) behind a
logging wrapper, so that the pauses of a tapdisk are known whoever made them (livesnap's CLI,
the baseline in this process): every call's start, end, exit status and arguments.

The wrapper is a bash script (about 2 ms per call; a Python one would add tens of ms to every
pause). It runs the real tap-ctl under ``setpriv --pdeathsig KILL``: a caller that kills the
wrapper on a timeout (livesnap's pause timeout) kills tap-ctl with it, as it would kill an
unwrapped tap-ctl, instead of leaving it holding the caller's pipes. bash has no monotonic
clock: it logs ``$EPOCHREALTIME`` (CLOCK_REALTIME, us), converted here to CLOCK_MONOTONIC (the
guest's ack log) by the offset of the two clocks taken when the wrapper is made.

A pause of a tapdisk, as the guest can see it: from the start of ``tap-ctl pause -p P -m M``
until the end of the next ``tap-ctl unpause -p P -m M`` (the real tapdisk's own paused interval
lies within it; a pause that failed, e.g. went unanswered, ends at that unpause too)."""
import os
import time

WRAPPER = """#!/bin/bash
# bench/xen.py: the real tap-ctl; each call's start, end (CLOCK_REALTIME), rc, args logged
s=$EPOCHREALTIME
setpriv --pdeathsig KILL %(real)s "$@"
rc=$?
e=$EPOCHREALTIME
echo "$s $e $rc $*" >> %(log)s
exit $rc
"""

_offset = []


def make(run_dir, real):
    """Write the wrapper of ``real`` into ``run_dir``: its path (for ``TAP_CTL``)."""
    wrapper = os.path.join(run_dir, "tap-ctl")
    with open(wrapper, "w") as f:
        f.write(WRAPPER % {"real": _quote(real), "log": _quote(log_path(run_dir))})
    os.chmod(wrapper, 0o755)
    # CLOCK_REALTIME - CLOCK_MONOTONIC, the smallest of a few reads (least preempted)
    _offset[:] = [min(time.time_ns() - time.monotonic_ns() for _ in range(5))]
    return wrapper


def _quote(s):
    return "'" + s.replace("'", "'\\''") + "'"


def log_path(run_dir):
    return os.path.join(run_dir, "tap-ctl.log")


def _ns(text):
    sec, _, frac = text.replace(",", ".").partition(".")
    return int(sec) * 10 ** 9 + int((frac + "000000000")[:9]) - _offset[0]


def calls(run_dir):
    """[(start ns, end ns, rc, [args])] of every tap-ctl call so far (monotonic ns)."""
    out = []
    try:
        with open(log_path(run_dir)) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    out.append((_ns(parts[0]), _ns(parts[1]), int(parts[2]), parts[3:]))
    except OSError:
        pass
    return out


def _target(args):
    """(pid, minor) a call's ``-p`` and ``-m`` name, or None."""
    kv = {}
    for flag, value in zip(args, args[1:]):
        if flag in ("-p", "-m"):
            kv[flag] = value
    try:
        return int(kv["-p"]), int(kv["-m"])
    except (KeyError, ValueError):
        return None


def pauses(run_dir, pid, minor):
    """The pauses of tapdisk ``pid``/``minor``: [(pause start, pause end, unpause start,
    unpause end)] (ns), one per ``pause`` followed by an ``unpause`` (a pause without one yet:
    unpause start and end now). Between pause end and unpause start the tapdisk is paused and
    its caller works; the two commands are tapdisk's drain and close, and its reopen."""
    out, pause = [], None
    for start, end, rc, args in calls(run_dir):
        if not args or _target(args) != (pid, minor):
            continue
        if args[0] == "pause" and pause is None:
            pause = (start, end)
        elif args[0] == "unpause" and pause is not None:
            out.append(pause + (start, end))
            pause = None
    if pause is not None:
        now = time.monotonic_ns()
        out.append(pause + (now, now))
    return out
