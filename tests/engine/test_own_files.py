"""livesnap deletes, truncates or renames only files it made (issue 16, class 2): a name
in an image directory under a trash name, or an image's name swapped after it was merged
away, may be anything; the sweep and the image removal leave it alone, with a warning, and
never change what it points to. A --dry-run frees nothing."""
import logging
import os
import stat

import pytest

from livesnap import datapaths
from livesnap.datapaths import own_files, trash
from livesnap.engine.engine import Engine

from helpers import URI

MiB = 1 << 20
NOBODY = 65534


@pytest.fixture(autouse=True)
def clean_state():
    del trash._pending[:]
    own_files.set_roots([])
    yield
    del trash._pending[:]
    own_files.set_roots([])


def _big(path, mib=40):
    with open(str(path), "wb") as f:
        f.truncate(mib * MiB)
        f.seek(mib * MiB - 1)
        f.write(b"x")
    return str(path)


def _tname(d, base="dom-vda.s1.qcow2"):
    return str(d / ("." + base + trash.SUFFIX))


@pytest.fixture
def pool(tmp_path):
    """An image directory and, elsewhere on the same file system, a victim root owns."""
    images = tmp_path / "images"
    images.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = _big(elsewhere / "precious", 40)
    return images, victim


def _sweep_and_free(images):
    trash.sweep([str(images)])
    trash.release(wait=True)


def _plant(kind, name, victim):
    if kind == "symlink":
        os.symlink(victim, name)
    elif kind == "hardlink":
        os.link(victim, name)
    elif kind == "other-owner":
        _big(name, 40)
        os.chown(name, NOBODY, NOBODY)
    elif kind == "fifo":
        os.mkfifo(name)
    elif kind == "device":
        os.mknod(name, 0o600 | stat.S_IFCHR, os.makedev(1, 3))   # as /dev/null
    elif kind == "directory":
        os.mkdir(name)
        _big(os.path.join(name, "inside"), 1)


KINDS = ["symlink", "hardlink", "other-owner", "fifo", "device", "directory"]


def _unchanged(kind, name, victim, before):
    """The planted name is still there, as planted, and what it points to is intact."""
    st = os.lstat(name)
    assert {"symlink": stat.S_ISLNK, "hardlink": stat.S_ISREG, "other-owner": stat.S_ISREG,
            "fifo": stat.S_ISFIFO, "device": stat.S_ISCHR,
            "directory": stat.S_ISDIR}[kind](st.st_mode)
    if kind == "other-owner":
        assert st.st_size == 40 * MiB and st.st_uid == NOBODY
    if kind == "directory":
        assert os.path.getsize(os.path.join(name, "inside")) == MiB
    assert os.path.getsize(victim) == 40 * MiB
    with open(victim, "rb") as f:
        f.seek(40 * MiB - 1)
        assert f.read() == b"x"
    assert os.stat(victim).st_ino == before


@pytest.mark.parametrize("kind", KINDS)
def test_the_sweep_leaves_a_planted_name_alone(pool, kind, caplog):
    """The reported case: a symbolic link under a trash name made root cut a 40 MiB file
    elsewhere to 8 MiB; nor a hard link, another user's file, a FIFO (whose open must not
    block), a device node or a directory."""
    images, victim = pool
    before = os.stat(victim).st_ino
    name = _tname(images)
    _plant(kind, name, victim)
    reader = None
    if kind == "fifo":            # a reader, so that the old code's blocking open returned
        reader = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with caplog.at_level(logging.WARNING, logger="livesnap"):
            _sweep_and_free(images)
    finally:
        if reader is not None:
            os.close(reader)
    _unchanged(kind, name, victim, before)
    assert "left alone" in caplog.text
    assert trash.pending() == []


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "other-owner", "fifo", "device"])
def test_the_detached_worker_leaves_a_planted_name_alone(pool, kind):
    """The worker re-checks what it frees: a name swapped after the sweep queued it."""
    images, victim = pool
    before = os.stat(victim).st_ino
    name = _tname(images)
    _plant(kind, name, victim)
    reader = None
    if kind == "fifo":
        reader = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert trash.worker([name]) == 1             # not freed: said so
    finally:
        if reader is not None:
            os.close(reader)
    _unchanged(kind, name, victim, before)


def test_the_sweep_still_frees_its_own_files(pool):
    images, victim = pool
    own = _big(images / (".a.qcow2" + trash.SUFFIX), 20)
    planted = _tname(images)
    os.symlink(victim, planted)
    _sweep_and_free(images)
    assert not os.path.exists(own)
    assert os.path.islink(planted) and os.path.getsize(victim) == 40 * MiB


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "other-owner", "device"])
@pytest.mark.parametrize("how", ["unlink", "free"])
def test_an_image_swapped_after_its_merge_is_not_freed_through(pool, kind, how, monkeypatch,
                                                               caplog):
    """A merged-away image whose name now holds something else: removing it (at once, in
    steps on a discarding file system, or through the trash) changes nothing there."""
    images, victim = pool
    before = os.stat(victim).st_ino
    monkeypatch.setattr(datapaths, "discards_on_free", lambda p: True)    # the step path
    name = str(images / "dom-vda.s1.qcow2")
    _plant(kind, name, victim)
    with caplog.at_level(logging.WARNING, logger="livesnap"):
        getattr(datapaths, how)(name)
        trash.release(wait=True)
    assert os.path.lexists(name)
    _unchanged(kind, name, victim, before)
    assert "left alone" in caplog.text


def test_a_directory_swapped_for_a_link_after_preflight_is_not_followed(tmp_path):
    """With a storage directory, the directory an image is removed from must lie inside it:
    an image directory replaced by a link to another directory is not entered."""
    storage = tmp_path / "storage"
    (storage / "vm").mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    victim = _big(other / "dom-vda.s1.qcow2", 1)
    own_files.set_roots([str(storage)])
    os.rmdir(str(storage / "vm"))
    os.symlink(str(other), str(storage / "vm"))
    datapaths.unlink(str(storage / "vm" / "dom-vda.s1.qcow2"))
    assert os.path.getsize(victim) == MiB


def test_a_directory_swapped_after_preflight_is_not_entered_without_storage_dirs(tmp_path):
    """Preflight pins the image directories it saw: a directory replaced by a link to
    another one holding a file of the same name is not entered later."""
    (tmp_path / "vm").mkdir()
    _big(tmp_path / "vm" / "dom-vda.s1.qcow2", 1)
    other = tmp_path / "other"
    other.mkdir()
    victim = _big(other / "dom-vda.s1.qcow2", 1)
    own_files.pin([str(tmp_path / "vm")])
    os.rename(str(tmp_path / "vm"), str(tmp_path / "vm.old"))
    os.symlink(str(other), str(tmp_path / "vm"))
    for how in (datapaths.unlink, datapaths.free):
        how(str(tmp_path / "vm" / "dom-vda.s1.qcow2"))
        assert os.path.getsize(victim) == MiB
    os.unlink(str(tmp_path / "vm"))
    os.rename(str(tmp_path / "vm.old"), str(tmp_path / "vm"))
    datapaths.unlink(str(tmp_path / "vm" / "dom-vda.s1.qcow2"))      # the pinned one: fine
    assert not os.path.exists(str(tmp_path / "vm" / "dom-vda.s1.qcow2"))


def test_a_name_planted_at_a_new_image_is_not_written_through(tmp_path):
    """Creating an overlay never opens through a link planted at its name."""
    victim = _big(tmp_path / "victim", 1)
    name = str(tmp_path / "new.qcow2")
    os.symlink(victim, name)
    with pytest.raises(Exception):
        own_files.remove(name)
    with pytest.raises(FileExistsError):
        own_files.create(name)
    assert os.path.getsize(victim) == MiB


def test_a_dry_run_frees_nothing(make_dom, monkeypatch):
    """A trash file livesnap left (its own) stays through any --dry-run; the next real
    command frees it."""
    real = trash.release
    monkeypatch.setattr(trash, "release", lambda wait=False: real(wait=True))  # in line
    dom = make_dom(ndisks=1)
    engine = Engine(connect=URI, state_dir=dom.state_dir)
    engine.create(dom.name, "s1")
    left = _big(os.path.join(dom.dir, ".x.qcow2" + trash.SUFFIX), 20)
    engine.create(dom.name, "s2", dry_run=True)
    engine.delete(dom.name, "s1", dry_run=True)
    engine.revert(dom.name, "s1", dry_run=True)
    assert os.path.getsize(left) == 20 * MiB
    assert trash.pending() == []
    engine.delete(dom.name, "s1")
    assert not os.path.exists(left)


def test_a_planted_link_in_a_domains_directory_survives_real_commands(make_dom, tmp_path):
    """The reported case end to end: a link under a trash name beside a domain's images."""
    dom = make_dom(ndisks=1)
    victim = _big(tmp_path / "precious", 40)
    planted = os.path.join(dom.dir, ".vda.qcow2" + trash.SUFFIX)
    os.symlink(victim, planted)
    engine = Engine(connect=URI, state_dir=dom.state_dir)
    engine.create(dom.name, "s1", dry_run=True)
    engine.create(dom.name, "s1")
    engine.delete(dom.name, "s1")
    assert os.path.islink(planted)
    assert os.path.getsize(victim) == 40 * MiB
