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
        if not has("liar"):              # "liar": answers 0 without pausing
            put("paused")                # done at once; the answer waits for a connection
        deadline = time.time() + 60
        while not (has("nudged") or has("prompt") or has("liar")) or has("deaf"):
            if time.time() > deadline:
                break
            time.sleep(0.01)
        put("answered")
    elif verb == "unpause":
        os.unlink(os.path.join(d, "paused"))
    elif verb == "list":
        if has("paused"):
            put("nudged")
        if has("answered") and "-m" in sys.argv:     # a check (get), not a nudge
            put("listed-after-answer")
        state = "0x2a" if has("paused") else "0"
        if state != "0" and has("busy") and "-m" not in sys.argv:
            state = "0x10"                   # "busy": the nudges see the pause requested only
        print("pid=7 minor=3 state=%s args=vhd:/sr/leaf.vhd" % state)
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


def test_the_nudge_that_saw_the_tapdisk_paused_is_the_check_after_the_pause(tapdisk):
    """No check (``list -p -m``) runs after the answer while the guest waits: the nudge's
    list, served while tapdisk had paused, already showed state 0x20."""
    disk = tap_ctl.pause(7, 3, timeout=20)
    assert disk.state & tap_ctl.PAUSED
    assert not (tapdisk / "listed-after-answer").exists()


def test_a_pause_no_nudge_saw_done_is_checked_by_a_list(tapdisk):
    (tapdisk / "prompt").write_text("")        # answered at once
    (tapdisk / "busy").write_text("")          # while the nudges saw it requested only
    disk = tap_ctl.pause(7, 3, timeout=20)
    assert disk.state & tap_ctl.PAUSED
    assert (tapdisk / "listed-after-answer").exists()


def test_a_pause_answered_but_not_paused_fails_before_the_block(tapdisk):
    (tapdisk / "liar").write_text("")
    ran = []
    with pytest.raises(tap_ctl.PauseFailed) as ei:
        with tap_ctl.paused(7, 3, path="/sr/leaf.vhd", timeout=20):
            ran.append(1)
    assert ran == []
    assert "state is 0x0 after pause, not paused" in str(ei.value)
    assert _nudgers() == []


@pytest.mark.parametrize("state", [0, tap_ctl.PAUSE_REQUESTED,
                                   tap_ctl.PAUSED | tap_ctl.QUIESCED | tap_ctl.CLOSED])
def test_nudges_early_then_when_the_retry_is_due_then_close_together_then_slowly(state):
    n = tap_ctl._Nudger(7, 3)
    first = n._next(state)                     # after the early nudge: until FIRST from start
    assert 0 <= first <= tap_ctl.PAUSE_NUDGE_FIRST
    waits = [n._next(state) for _ in range(tap_ctl.PAUSE_NUDGE_CLOSE + 2)]
    assert waits == [tap_ctl.PAUSE_NUDGE_CLOSE_WAIT] * tap_ctl.PAUSE_NUDGE_CLOSE + \
        [tap_ctl.PAUSE_NUDGE_INTERVAL] * 2


def test_a_nudge_whose_list_failed_is_followed_at_the_slow_pace():
    n = tap_ctl._Nudger(7, 3)
    n._next(0)
    assert n._next(None) == tap_ctl.PAUSE_NUDGE_INTERVAL


def test_a_nudge_sees_only_its_own_minor_paused():
    n = tap_ctl._Nudger(7, 3)
    assert n._state("pid=7 minor=2 state=0x2a args=vhd:/a\npid=7 minor=3 state=0x10 "
                    "args=vhd:/b\n") == tap_ctl.PAUSE_REQUESTED
    assert n.paused is None
    assert n._state("pid=7 minor=3 state=0x2a args=vhd:/b\n") == 0x2a
    assert n.paused.path == "/b"
    assert n._state("garbage") is None


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
