"""Test-only fault points: ``LIVESNAP_FAULT=<op>:<when>:<step>[:<action>]`` acts at that point,
so crash recovery can be tested at every journal step.

``when`` is ``before`` (intent recorded, step not started) or ``after`` (step carried out,
not yet marked done). ``op`` may be ``*``. Datapaths add points of their own inside a step:
``job:started:0`` right after a block job was started (it goes on running in QEMU),
``tapdisk:renamed:0`` inside a tapdisk pause right after a leaf was renamed,
``cbt:renamed:0`` inside a tapdisk pause right after a leaf's CBT log became the snapshot's,
before the leaf's new log is in place,
``quiesce:frozen:0`` while the guest's file systems are frozen,
``snapshot:overlays:0`` when a live snapshot's overlays are made, before the switch,
``snapshot:switched:0`` right after a live snapshot's switch (and thaw), before its checks,
``lvm:created:0`` after a new qcow2 image's LV was created, before qemu-img writes it,
``lvm:inflated:0`` after a merge target's LV was made writable and inflated,
``merge:reparented:0`` after a commit (VHD) pointed the children at the target, before the
merged image is removed,
``bitmaps:kept:0`` after an offline merge gave the surviving image the other's dirty
bitmaps, before the data moves,
``trash:emptying:0`` in the detached process that frees merged-away images, before each;
``<op>:committed:0`` after the last step's effect is committed to the catalog, before
libvirt's snapshot metadata (XAPI's records) are brought in step;
``xapi:snapshotted:0`` right after ``VM.snapshot`` made a snapshot's VM record, before
livesnap marked it (livesnap/platforms/xapi_records.py),
``xapi:recorded:0`` after a snapshot's record has its VBDs, before its VDIs name it.
``action`` is ``kill`` (SIGKILL, the default), ``sleep=SECONDS`` (a stall) or ``wait`` (a
stall until the file named by ``LIVESNAP_FAULT_RELEASE`` exists, at most 120 s: the test
does something at that point, then lets the process go on).
``LIVESNAP_FAULT_REACHED=<path>``: the point creates that file before it acts, so a test can
wait for the process to be in the stall instead of guessing how long it takes to get there.
"""
import os
import signal
import time


def point(op, when, index):
    spec = os.environ.get("LIVESNAP_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    want_op, want_when, want_index = parts[:3]
    action = parts[3] if len(parts) > 3 else "kill"
    if want_op in ("*", op) and want_when == when and int(want_index) == index:
        reached = os.environ.get("LIVESNAP_FAULT_REACHED")
        if reached:
            with open(reached, "a"):
                pass
        if action.startswith("sleep="):
            time.sleep(float(action[len("sleep="):]))
        elif action == "wait":
            release = os.environ.get("LIVESNAP_FAULT_RELEASE", "")
            deadline = time.monotonic() + 120
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
