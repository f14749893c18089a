"""Images merged away on a running domain are freed after the command (datapaths.trash)."""
import fcntl
import os
import time

import pytest

from livesnap import datapaths
from livesnap.datapaths import trash
from livesnap.lock import DomainLock

MiB = 1 << 20


@pytest.fixture(autouse=True)
def empty_queue():
    del trash._pending[:]
    yield
    del trash._pending[:]


def _big(path, mib=40):
    with open(str(path), "wb") as f:
        f.truncate(mib * MiB)
        f.seek(mib * MiB - 1)
        f.write(b"x")
    return str(path)


def _wait_gone(path, timeout=10.0):
    end = time.monotonic() + timeout
    while os.path.exists(path):
        assert time.monotonic() < end, "%s still there" % path
        time.sleep(0.01)


def test_free_of_a_big_image_on_a_discarding_fs_is_deferred(tmp_path, monkeypatch):
    monkeypatch.setattr(datapaths, "discards_on_free", lambda p: True)
    img = _big(tmp_path / "dom-vda.s1.qcow2")
    datapaths.free(img)
    assert not os.path.exists(img)
    hidden = trash.trash_name(img)
    assert trash.pending() == [hidden]
    assert os.path.basename(hidden).startswith(".")
    # no storage scan takes it for an image
    assert not hidden.endswith((".qcow2", ".vhd", ".raw", ".img"))
    assert os.path.getsize(hidden) == 40 * MiB
    datapaths.free(img)                       # re-run of the step after a crash: fine
    assert trash.pending() == [hidden]


def test_free_elsewhere_or_of_a_small_image_unlinks_now(tmp_path, monkeypatch):
    monkeypatch.setattr(datapaths, "discards_on_free", lambda p: False)
    big = _big(tmp_path / "big.qcow2")
    datapaths.free(big)
    monkeypatch.setattr(datapaths, "discards_on_free", lambda p: True)
    small = _big(tmp_path / "small.qcow2", mib=4)
    datapaths.free(small)
    assert not os.listdir(str(tmp_path))
    assert trash.pending() == []


def test_release_frees_in_a_detached_process_holding_no_inherited_descriptor(
        tmp_path, monkeypatch):
    """The worker holds neither the domain lock nor the caller's pipes: only /dev/null on
    0-2 (it is stalled at its fault point while this test looks at it)."""
    monkeypatch.setattr(datapaths, "discards_on_free", lambda p: True)
    monkeypatch.setenv("LIVESNAP_FAULT", "trash:emptying:0:sleep=3")
    lock_path = str(tmp_path / "dom.lock")
    img = _big(tmp_path / "img.qcow2")
    r, w = os.pipe()
    os.set_inheritable(w, True)                 # even an inheritable one is not passed
    with DomainLock(lock_path, "dom"):
        datapaths.free(img)
        hidden = trash.pending()[0]
        pid = trash.release()
    assert pid is not None and trash.pending() == []
    # while it starts, the interpreter has files of its own open for a moment (the loader's
    # libc.so.6, a module's source): wait for it to settle; an inherited one would stay
    want = {"0": "/dev/null", "1": "/dev/null", "2": "/dev/null"}
    deadline = time.monotonic() + 2.5
    while True:
        fds = {}
        for n in os.listdir("/proc/%d/fd" % pid):
            try:
                fds[n] = os.readlink("/proc/%d/fd/%s" % (pid, n))
            except OSError:                         # closed meanwhile
                pass
        if fds == want or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert fds == want, fds
    assert os.getsid(pid) == pid                # its own session
    with DomainLock(lock_path, "dom"):          # the next command may lock the domain now
        assert os.path.exists(hidden)           # while the file is still being freed
    os.close(w)
    assert os.read(r, 1) == b""                 # nobody else holds the pipe's write end
    os.close(r)
    _wait_gone(hidden)


def test_the_worker_reports_what_it_could_not_free(tmp_path):
    odd = tmp_path / (".odd" + trash.SUFFIX)
    odd.mkdir()                                 # cannot be opened for writing: EISDIR
    left = _big(tmp_path / (".a" + trash.SUFFIX))
    assert trash.worker([str(odd), str(tmp_path / "missing"), left]) == 1
    assert odd.is_dir() and not os.path.exists(left)
    assert trash.worker([left]) == 0


def test_release_of_relative_names_frees_them_in_their_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    left = _big(tmp_path / (".rel" + trash.SUFFIX))
    trash.sweep(["."])
    assert trash.release() is not None
    _wait_gone(left)


def test_sweep_frees_what_a_dead_process_left(tmp_path):
    left = _big(tmp_path / (".dom-vda.s1.qcow2" + trash.SUFFIX))
    keep = _big(tmp_path / "dom-vda.qcow2", mib=1)
    trash.sweep([str(tmp_path), str(tmp_path / "missing")])
    assert trash.pending() == [left]
    trash.release(wait=True)
    assert os.listdir(str(tmp_path)) == [os.path.basename(keep)]


def test_a_file_being_freed_by_another_process_is_left_to_it(tmp_path):
    path = _big(tmp_path / (".x" + trash.SUFFIX))
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert trash.empty(path) is False
        assert os.path.getsize(path) == 40 * MiB
    finally:
        os.close(fd)
    assert trash.empty(path) is True
    assert not os.path.exists(path)
    assert trash.empty(path) is False          # gone: nothing to do


def test_empty_shrinks_in_steps_before_unlinking(tmp_path, monkeypatch):
    path = _big(tmp_path / (".y" + trash.SUFFIX), mib=20)
    sizes = []
    real = os.ftruncate
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: (sizes.append(n), real(fd, n)))
    assert trash.empty(path, step=8 * MiB)
    assert sizes == [12 * MiB, 4 * MiB]
    assert not os.path.exists(path)
