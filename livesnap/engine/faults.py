"""Test-only fault points: ``LIVESNAP_FAULT=<op>:<when>:<step>`` kills the process (SIGKILL)
at that point, so crash recovery can be tested at every journal step.

``when`` is ``before`` (intent recorded, step not started) or ``after`` (step carried out,
not yet marked done). ``op`` may be ``*``. Datapaths add points of their own inside a step:
``job:started:0`` right after a block job was started (it goes on running in QEMU).
"""
import os
import signal


def point(op, when, index):
    spec = os.environ.get("LIVESNAP_FAULT")
    if not spec:
        return
    want_op, want_when, want_index = spec.split(":")
    if want_op in ("*", op) and want_when == when and int(want_index) == index:
        os.kill(os.getpid(), signal.SIGKILL)
