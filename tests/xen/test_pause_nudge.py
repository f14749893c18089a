"""livesnap's pause gets tapdisk's answer although tapdisk leaves a finished pause unanswered
until some other event wakes its event loop (blktap drivers/tapdisk-control.c
``tapdisk_control_pause_vbd``; see livesnap/tools/tap_ctl.py and docs/xen.md).

The real tapdisk does this only when its last in-flight request completes within 10 ms of a
pause try, so these tests use a tap-ctl that does it every time: its ``pause`` is answered only
once another tap-ctl connected to the tapdisk (``list``) after the pause began; the tests
with the real tapdisk (tests/xen/test_tapdisk.py...) pause through the same code."""
import sys
import textwrap
import threading

import pytest

from livesnap.tools import tap_ctl

FAKE = textwrap.dedent('''\
    import os, sys, time
    d = os.environ["FAKE_TAPDISK"]
    def has(name):
        return os.path.exists(os.path.join(d, name))
    def put(name):
        open(os.path.join(d, name), "w").close()
    verb = sys.argv[1]
    if verb == "pause":
        put("paused")                    # done at once; the answer waits for a connection
        deadline = time.time() + 60
        while not (has("nudged") and not has("deaf")) and time.time() < deadline:
            time.sleep(0.01)
    elif verb == "unpause":
        os.unlink(os.path.join(d, "paused"))
    elif verb == "list":
        if has("paused"):
            put("nudged")
        print("pid=7 minor=3 state=%s args=vhd:/sr/leaf.vhd" % ("0x2a" if has("paused") else "0"))
    ''')


@pytest.fixture
def tapdisk(tmp_path, monkeypatch):
    script = tmp_path / "fake_tap_ctl.py"
    script.write_text(FAKE)
    wrapper = tmp_path / "tap-ctl"
    wrapper.write_text("#!/bin/sh\nexec %s %s \"$@\"\n" % (sys.executable, script))
    wrapper.chmod(0o755)
    state = tmp_path / "tapdisk"
    state.mkdir()
    monkeypatch.setenv("TAP_CTL", str(wrapper))
    monkeypatch.setenv("FAKE_TAPDISK", str(state))
    return state


def _nudgers():
    return [t for t in threading.enumerate() if t.name.startswith("tap-ctl-nudge")]


def test_a_finished_pause_left_unanswered_is_answered(tapdisk):
    disk = tap_ctl.pause(7, 3, timeout=20)
    assert disk.state & tap_ctl.PAUSED
    assert (tapdisk / "nudged").exists()
    assert _nudgers() == []


def test_paused_block_runs_and_unpauses(tapdisk):
    with tap_ctl.paused(7, 3, path="/sr/leaf.vhd", timeout=20) as win:
        assert win.paused
    assert not (tapdisk / "paused").exists()
    assert _nudgers() == []


def test_a_pause_never_answered_still_times_out_and_is_undone(tapdisk):
    (tapdisk / "deaf").write_text("")          # a tapdisk that nothing wakes
    with pytest.raises(tap_ctl.PauseTimeout) as ei:
        tap_ctl.pause(7, 3, timeout=1.0)
    assert (ei.value.pid, ei.value.minor) == (7, 3)
    assert "no answer within" in str(ei.value)
    assert not (tapdisk / "paused").exists()       # the late pause undone
    assert _nudgers() == []
