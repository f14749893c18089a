"""The LVM wrapper at the command level: a fake LVM (volumes are regular files) first on PATH
records every argv; inflate/deflate move a real VHD footer as SM does."""
import json
import os
import sys

import pytest

from livesnap import vhd
from livesnap.errors import CommandFailed, NoSpace
from livesnap.tools import lvm
from testxen import blktap as real_blktap

MiB = 1 << 20

FAKE = r'''#!%(python)s
import json, os, sys
cmd = os.path.basename(sys.argv[0])
args = sys.argv[1:]
if cmd == "lvm":
    cmd, args = args[0], args[1:]
root = os.environ["FAKE_LVM_ROOT"]
with open(os.path.join(root, "argv.log"), "a") as f:
    f.write(json.dumps([cmd] + args) + "\n")
free = int(os.environ.get("FAKE_VG_FREE", str(1 << 40)))

def size_of(opt):
    v = args[args.index(opt) + 1]
    assert v.endswith("b"), v
    return int(v[:-1])

def lvfile(vglv):
    vg, lv = vglv.split("/")
    return os.path.join(root, vg, lv)

def missing(vglv):
    sys.stderr.write('  Failed to find logical volume "%%s"\n' %% vglv)
    sys.exit(5)

if cmd == "lvcreate":
    vg, lv, size = args[-1], args[args.index("-n") + 1], size_of("-L")
    p = os.path.join(root, vg, lv)
    if os.path.exists(p):
        sys.stderr.write('  Logical Volume "%%s" already exists in volume group "%%s"\n' %% (lv, vg))
        sys.exit(5)
    if size > free:
        sys.stderr.write('  Volume group "%%s" has insufficient free space (2 extents): %%d required.\n' %% (vg, size // 4194304))
        sys.exit(5)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.truncate(size)
elif cmd == "lvrename":
    vg, old, new = args
    if not os.path.exists(os.path.join(root, vg, old)):
        missing(vg + "/" + old)
    os.rename(os.path.join(root, vg, old), os.path.join(root, vg, new))
elif cmd == "lvresize":
    p = lvfile(args[-1])
    if not os.path.exists(p):
        missing(args[-1])
    size = size_of("-L")
    if size < os.path.getsize(p) and "-f" not in args:
        sys.stderr.write("  Do you really want to reduce? [y/n]: n\n  Logical volume not resized.\n")
        sys.exit(5)
    with open(p, "r+b") as f:
        f.truncate(size)
elif cmd == "lvremove":
    p = lvfile(args[-1])
    if not os.path.exists(p):
        missing(args[-1])
    os.unlink(p)
elif cmd == "lvchange":
    if not os.path.exists(lvfile(args[-1])):
        missing(args[-1])
elif cmd == "lvs":
    p = lvfile(args[-1])
    if not os.path.exists(p):
        missing(args[-1])
    print("  %%d" %% os.path.getsize(p))
else:
    sys.stderr.write("fake lvm: unknown command %%s\n" %% cmd)
    sys.exit(3)
'''


@pytest.fixture
def fake_lvm(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "lvm"
    script.write_text(FAKE % {"python": sys.executable})
    script.chmod(0o755)
    for cmd in ("lvcreate", "lvrename", "lvresize", "lvremove", "lvchange", "lvs"):
        os.symlink("lvm", str(bindir / cmd))
    root = tmp_path / "lvmroot"
    root.mkdir()
    monkeypatch.setenv("PATH", "%s:%s" % (bindir, os.environ["PATH"]))
    monkeypatch.setenv("FAKE_LVM_ROOT", str(root))
    for var in ("LVM", "LVCREATE", "LVRENAME", "LVRESIZE", "LVREMOVE", "LVCHANGE", "LVS"):
        monkeypatch.delenv(var, raising=False)

    class Fake(object):
        def argv(self):
            with open(str(root / "argv.log")) as f:
                return [json.loads(l) for l in f]

        def lv(self, vg, lv):
            return str(root / vg / lv)
    return Fake()


def test_verbs_build_argv_and_parse(fake_lvm, monkeypatch):
    lvm.lvcreate("VG_X", "VHD-a", 8 * MiB, tag="journaler")
    lvm.lvresize("VG_X", "VHD-a", 12 * MiB)
    assert lvm.lv_size("VG_X", "VHD-a") == 12 * MiB
    lvm.lvrename("VG_X", "VHD-a", "VHD-b")
    lvm.set_readonly("VG_X", "VHD-b")
    lvm.set_readonly("VG_X", "VHD-b", False)
    lvm.lvremove("VG_X", "VHD-b")
    assert fake_lvm.argv() == [
        ["lvcreate", "-n", "VHD-a", "-L", "8388608b", "--addtag", "journaler", "VG_X"],
        ["lvresize", "-L", "12582912b", "VG_X/VHD-a"],
        ["lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size", "VG_X/VHD-a"],
        ["lvrename", "VG_X", "VHD-a", "VHD-b"],
        ["lvchange", "-p", "r", "VG_X/VHD-b"],
        ["lvchange", "-p", "rw", "VG_X/VHD-b"],
        ["lvremove", "-f", "VG_X/VHD-b"]]
    # LVM= selects the multi-call binary, a per-command variable wins over it
    monkeypatch.setenv("LVM", "lvm")
    assert lvm._bin("lvs") == ["lvm", "lvs"]
    monkeypatch.setenv("LVS", "/opt/lvs")
    assert lvm._bin("lvs") == ["/opt/lvs"]


def test_errors_are_typed(fake_lvm, monkeypatch):
    with pytest.raises(lvm.LvNotFound) as ei:
        lvm.lv_size("VG_X", "nope")
    assert (ei.value.vg, ei.value.lv, ei.value.rc) == ("VG_X", "nope", 5)
    with pytest.raises(lvm.LvNotFound):
        lvm.lvrename("VG_X", "nope", "other")
    lvm.lvcreate("VG_X", "a", 4 * MiB)
    with pytest.raises(lvm.LvExists):
        lvm.lvcreate("VG_X", "a", 4 * MiB)
    monkeypatch.setenv("FAKE_VG_FREE", str(16 * MiB))
    with pytest.raises(NoSpace) as ei:
        lvm.lvcreate("VG_X", "big", 64 * MiB)
    assert isinstance(ei.value, lvm.LvNoSpace) and ei.value.needed == 64 * MiB
    with pytest.raises(CommandFailed):                # a shrink without allow_shrink
        lvm.lvresize("VG_X", "a", 512)
    assert os.path.getsize(fake_lvm.lv("VG_X", "a")) == 4 * MiB
    with pytest.raises(ValueError):
        lvm.lvcreate("VG_X", "odd", 1000)


def test_full_size_matches_sm():
    # SM lvhdutil.calcSizeVHDLV: 2 TiB metadata (4329472 B) + bitmaps, 4 MiB extents
    assert lvm.empty_overhead(2 << 40) == 4329472
    assert lvm.full_size(64 * MiB) == 75497472
    assert lvm.full_size(1 << 30) == 1 << 30 | 8 * MiB


def test_inflate_and_deflate_a_vhd_on_an_lv(fake_lvm, monkeypatch):
    monkeypatch.setenv("VHD_UTIL", "%s -m livesnap.vhd" % sys.executable)
    lvm.lvcreate("VG_X", "VHD-a", 4 * MiB)
    path = fake_lvm.lv("VG_X", "VHD-a")
    os.unlink(path)                                   # the LV's content: a VHD
    vhd.create(path, 64 * MiB)
    vhd.write(path, 3 * MiB, b"d" * 8192)
    assert lvm.inflate("VG_X", "VHD-a", path) == 75497472
    assert os.path.getsize(path) == 75497472
    assert vhd.check(path) == [] == real_blktap.check(path) and vhd.read(path, 3 * MiB, 8192) == b"d" * 8192
    assert ["lvresize", "-L", "75497472b", "VG_X/VHD-a"] in fake_lvm.argv()
    n = len(fake_lvm.argv())
    assert lvm.inflate("VG_X", "VHD-a", path) == 75497472          # already inflated: no-op
    assert not [a for a in fake_lvm.argv()[n:] if a[0] == "lvresize"]
    phys = vhd.query(path).physical_size
    assert lvm.deflate("VG_X", "VHD-a", path) == lvm.round_extent(phys) == 4 * MiB
    assert fake_lvm.argv()[-1] == ["lvresize", "-f", "-L", "4194304b", "VG_X/VHD-a"]
    assert os.path.getsize(path) == 4 * MiB
    assert vhd.check(path) == [] == real_blktap.check(path) and vhd.read(path, 3 * MiB, 8192) == b"d" * 8192
