"""LVHD chains livesnap makes, reached as on a XAPI host and read by the real blktap vhd-util.

On a host an LVHD image is ``/dev/VG_XenStorage-<sr>/VHD-<vdi>``, a link to the device that
``/dev/mapper/VG_XenStorage--<sr>-VHD--<vdi>`` also links to, and libvhd resolves a parent
locator against the ``/dev/mapper`` name (livesnap/vhd/paths.py). Device-mapper does not run
here, so each test runs in a private mount namespace (``unshare -m``) with an overlay over
/dev and a /dev/mapper of its own: the LVM stand-in (testxen/lvm.py: real LVM metadata,
loop devices) makes a block node ``/dev/mapper/<dm name>`` for each active LV and
``/dev/<vg>/<lv>`` a link to it, as LVM does in XenServer's dom0. The
real ``vhd-util`` (the blktap build of scripts/build-blktap.sh; a missing build fails) then
sees what it sees on a host.

The scenario runs in the namespace (``python this-file SCENARIO``) and prints facts as JSON;
the tests assert on them.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid

from testxen import blktap as txblktap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20
MSIZE_MB = 2 * 1024 * 1024          # SM lvhdutil.MSIZE_MB


def run_in_namespace(scenario, *args):
    """Run ``scenario`` of this file in a private mount namespace; its JSON result."""
    env = dict(os.environ, PYTHONPATH=ROOT, LIVESNAP_TEST_BLKTAP=txblktap.prefix())
    p = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable,
                        os.path.abspath(__file__), scenario] + list(args),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, cwd=ROOT, env=env)
    assert p.returncode == 0, "scenario %s failed:\n%s\n%s" % (scenario, p.stdout, p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


# --- tests ---------------------------------------------------------------------------------

def test_real_vhd_util_resolves_the_parents_of_a_chain_livesnap_made_on_lvs():
    r = run_in_namespace("chain")
    vg, m = r["vg"], r["mapper"]
    # what SM's vhd-util snapshot writes on a host, livesnap writes
    assert r["locators"]["leaf"] == ["./" + m["mid"]] * 3
    assert r["locators"]["mid"] == ["./" + m["base"]] * 3
    assert r["locators"]["ref"] == r["locators"]["leaf"]
    assert r["prt_name"]["leaf"] == r["prt_name"]["ref"] == m["mid"]
    # and the real vhd-util finds every parent through the /dev/mapper names
    assert r["query_p"]["leaf"] == [0, "/dev/mapper/" + m["mid"]]
    assert r["query_p"]["mid"] == [0, "/dev/mapper/" + m["base"]]
    assert r["check_p"]["leaf"][0] == 0, r["check_p"]["leaf"]
    assert r["check_p"]["mid"][0] == 0, r["check_p"]["mid"]
    # livesnap names the chain by the LV paths, as before
    assert r["chain"] == ["/dev/%s/%s" % (vg, n) for n in r["lvs"]]
    assert r["read_ok"]
    # the real tapdisk opens the chain, and reopens it after a pause (unpause -a)
    assert r["tapdisk"] == ["0", "0", 0], r["tapdisk"]
    # a delete's reparent (set_parent) writes the same form: the leaf now on the base
    assert r["reparented"]["locators"] == ["./" + m["base"]] * 3
    assert r["reparented"]["query_p"] == [0, "/dev/mapper/" + m["base"]]
    assert r["reparented"]["check_p"][0] == 0, r["reparented"]["check_p"]
    # the chain of a detached VDI (LVs inactive: no device, no /dev/mapper name) is walked
    # by the LV names the locators give (Activation)
    assert r["inactive_parent"] == "/dev/%s/%s" % (vg, r["lvs"][1])
    assert r["activated_chain"] == r["chain"]


def test_new_lvhd_children_have_the_metadata_reserve_and_lv_size_sm_gives_them():
    r = run_in_namespace("reserve")
    for case in r["cases"]:
        v = case["virtual"]
        # byte for byte what the real vhd-util snapshot -S 2097152 (SM's vhdutil.snapshot
        # with lvhdutil.MSIZE_MB) writes for the same parent on an LV of the same size,
        # but for the new image's UUID and time stamps
        assert case["differences"] == [], (v, case["differences"])
        assert case["query_S"] == [0, str(MSIZE_MB)], (v, case["query_S"])   # fast resize
        assert case["leaf_lv"] == case["sm_full"], v           # lvhdutil.calcSizeVHDLV
        assert case["check_p"][0] == 0, (v, case["check_p"])
        # a child that is not a leaf: the smallest LV that holds that metadata (SM's thinpr)
        assert case["thin_lv"] == 8 * MiB, v
        assert case["thin_check"][0] == 0, (v, case["thin_check"])
        assert case["thin_query_S"] == [0, str(MSIZE_MB)], v


def test_dashes_in_vg_and_lv_names_are_doubled_and_undone():
    from livesnap.vhd import paths
    vg, lv = "VG_XenStorage-1b2c-3d", "VHD-a-b--c"
    name = paths.mapper_name(vg, lv)
    assert name == "VG_XenStorage--1b2c--3d-VHD--a--b----c"
    assert paths.split_mapper_name(name) == (vg, lv)
    assert paths.lv_path("/dev/mapper/" + name) == "/dev/%s/%s" % (vg, lv)
    assert paths.canonpath("/dev/%s/%s" % (vg, lv)) == "/dev/mapper/" + name
    assert paths.relative_path("/dev/%s/VHD-x" % vg, "/dev/%s/%s" % (vg, lv)) == "./" + name
    for not_lv in ("/dev/mapper/control", "/dev/loop3", "/dev/mapper/a-b-c", "/dev/sda"):
        assert paths.lv_of(not_lv) is None, not_lv
    assert paths.split_mapper_name("VHD-6ca40657-fa30") is None     # an old livesnap locator
    # an image reached by its loop or dm-N device: a device-mapper name is still that LV
    assert paths.resolve("/dev/loop5", "./" + name) == "/dev/%s/%s" % (vg, lv)
    assert paths.resolve("/dev/%s/VHD-x" % vg, "./" + name) == "/dev/%s/%s" % (vg, lv)
    assert paths.resolve("/dev/%s/VHD-x" % vg, "./VHD-6ca4-fa30") == "/dev/mapper/VHD-6ca4-fa30"


def test_file_locators_are_what_vhd_util_writes_through_linked_directories(tmp_path):
    """On files libvhd resolves symlinks (realpath) before it writes a locator: a parent named
    through a linked directory gets the locator and parent name vhd-util would give it."""
    from livesnap import vhd
    vhd_util = os.path.join(txblktap.prefix(), "bin", "vhd-util")
    sr = tmp_path / "sr"
    sr.mkdir()
    (tmp_path / "other").mkdir()
    os.symlink(str(sr), str(tmp_path / "link"))           # as /var/run -> /run
    os.symlink(str(sr / "base.vhd"), str(tmp_path / "other" / "named.vhd"))
    subprocess.check_call([vhd_util, "create", "-n", str(sr / "base.vhd"), "-s", "16"])
    for i, parent in enumerate((str(tmp_path / "link" / "base.vhd"),
                                str(tmp_path / "other" / "named.vhd"))):
        mine, ref = str(sr / ("mine%d.vhd" % i)), str(sr / ("ref%d.vhd" % i))
        vhd.snapshot(mine, parent)
        subprocess.check_call([vhd_util, "snapshot", "-n", ref, "-p", parent])
        assert _locators(mine) == _locators(ref) == (["./base.vhd"] * 3, "base.vhd"), parent
        p = subprocess.run([vhd_util, "query", "-n", mine, "-p"], stdout=subprocess.PIPE,
                           universal_newlines=True)
        assert p.returncode == 0 and p.stdout.strip() == str(sr / "base.vhd")
        assert vhd.query(mine).parent == str(sr / "base.vhd")


# --- the namespace side --------------------------------------------------------------------



class HostLayout(object):
    """In the namespace: /dev overlaid, a VG of the LVM stand-in (its /dev/mapper nodes)."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="smlayout", dir="/tmp")
        ov = os.path.join(self.tmp, "ov")
        os.makedirs(ov)
        subprocess.check_call(["mount", "-t", "tmpfs", "none", ov])
        os.makedirs(os.path.join(ov, "u"))
        os.makedirs(os.path.join(ov, "w"))
        subprocess.check_call(["mount", "-t", "overlay", "overlay", "-o",
                               "lowerdir=/dev,upperdir=%s/u,workdir=%s/w" % (ov, ov), "/dev"])
        # a /dev/mapper of our own (others' names, and any made since, stay outside)
        subprocess.check_call(["mount", "-t", "tmpfs", "none", "/dev/mapper"])
        self.root = os.path.join(self.tmp, "vg")
        os.environ["TESTXEN_LVM_ROOT"] = self.root
        # the LVM stand-in makes the /dev/mapper nodes and /dev/<vg>/<lv> links itself, as
        # LVM does in XenServer's dom0 (testxen/lvm.py)
        os.environ["LVM"] = os.path.join(ROOT, "testxen", "lvm")
        os.environ["LIVESNAP_SM_REFCOUNT_DIR"] = os.path.join(self.tmp, "refcount")
        from testxen import lvm as standin
        self.sr = str(uuid.uuid4())
        self.vg = "VG_XenStorage-%s" % self.sr
        standin.make_vg(self.root, self.vg, 16 << 30)
        self.vhd_util = os.path.join(os.environ["LIVESNAP_TEST_BLKTAP"], "bin", "vhd-util")

    def path(self, lv):
        return "/dev/%s/%s" % (self.vg, lv)

    def run(self, *args):
        p = subprocess.run([self.vhd_util] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True)
        return [p.returncode, p.stdout.strip()]

    def close(self):
        from testxen import lvm as standin
        try:
            standin.destroy_vg(self.root)
        finally:                    # this namespace's mounts, then the directory
            subprocess.call(["umount", "-l", "/dev"])
            subprocess.call(["umount", "-l", os.path.join(self.tmp, "ov")])
            shutil.rmtree(self.tmp, ignore_errors=True)


def _locators(path):
    from livesnap import vhd
    with vhd.open_image(path, chain=False) as img:
        return [text for _, _, text in img.parent_locators()], img.header.parent_name


def _tapdisk_open_pause_reopen(leaf):
    """The real tapdisk opens the chain of ``leaf``, is paused and reopens it with
    ``unpause -a`` (what livesnap's snapshot does); [state after open, after reopen, rc of the
    unpause]. Destroyed (killed if need be) before returning."""
    tap_ctl = os.path.join(os.environ["LIVESNAP_TEST_BLKTAP"], "testbed", "tap-ctl")

    def run(*args):
        p = subprocess.run([tap_ctl] + [str(a) for a in args], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
        return p.returncode, p.stdout

    def state(pid, minor):
        rc, text = run("list", "-p", pid, "-m", minor)
        return text.split("state=")[1].split()[0] if "state=" in text else None

    rc, text = run("create", "-a", "vhd:" + leaf)
    if rc:
        return ["create failed: %s" % text]
    pid = minor = None
    try:
        minor = int(re.search(r"(\d+)\s*$", text).group(1))   # .../tapdisk-<minor>
        for _ in range(10):         # tap-ctl list asks every tapdisk here, others' too
            rc, text = run("list", "-m", minor)
            fields = dict(t.split("=", 1) for t in text.split() if "=" in t)
            if rc == 0 and fields.get("args") == "vhd:" + leaf:
                pid = int(fields["pid"])
                break
        else:
            return ["not listed: %s" % text]
        opened = state(pid, minor)
        run("pause", "-p", pid, "-m", minor)
        rc, text = run("unpause", "-p", pid, "-m", minor, "-a", "vhd:" + leaf)
        return [opened, state(pid, minor), rc]
    finally:
        if pid is None:             # not listed: the tapdisk with our leaf open, by /proc
            pid = _tapdisk_holding(os.path.realpath(leaf))
        if pid is not None:
            if minor is not None:
                run("destroy", "-p", pid, "-m", minor)
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def _tapdisk_holding(device):
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == device:
                pid = int(fd.split("/")[2])
                with open("/proc/%d/comm" % pid) as f:
                    if f.read().strip() == "tapdisk":
                        return pid
        except (OSError, ValueError):
            pass
    return None


def scenario_chain():
    from livesnap import vhd
    from livesnap.datapaths import vhd_storage
    from livesnap.tools import lvm
    h = HostLayout()
    try:
        out = {"vg": h.vg}
        names = {k: "VHD-%s" % uuid.uuid4() for k in ("base", "mid", "leaf", "ref")}
        out["lvs"] = [names["leaf"], names["mid"], names["base"]]
        out["mapper"] = {k: lvm_name(h.vg, v) for k, v in names.items()}
        p = {k: h.path(v) for k, v in names.items()}
        # the VDI as SM makes it (vhdutil.create with the 2 TiB reserve, on a full-size LV)
        lvm.lvcreate(h.vg, names["base"], lvm.full_size(64 * MiB))
        rc = h.run("create", "-n", p["base"], "-s", "64", "-S", str(MSIZE_MB))
        assert rc[0] == 0, rc
        vhd.write(p["base"], 0, b"\x5a" * (3 * MiB))
        st = vhd_storage.for_path(p["base"])
        st.create_child(p["mid"], p["base"], leaf=True)
        vhd.write(p["mid"], 2 * MiB, b"\xa5" * MiB)
        st.freeze(p["mid"])
        st.create_child(p["leaf"], p["mid"], leaf=True)
        # what the real vhd-util snapshot writes for a sibling of the leaf
        lvm.lvcreate(h.vg, names["ref"], lvm.full_size(64 * MiB))
        rc = h.run("snapshot", "-n", p["ref"], "-p", p["mid"], "-S", str(MSIZE_MB))
        assert rc[0] == 0, rc
        out["locators"], out["prt_name"] = {}, {}
        for k in ("leaf", "mid", "ref"):
            out["locators"][k], out["prt_name"][k] = _locators(p[k])
        out["query_p"] = {k: h.run("query", "-n", p[k], "-p") for k in ("leaf", "mid")}
        out["check_p"] = {k: h.run("check", "-n", p[k], "-p") for k in ("leaf", "mid")}
        out["chain"] = vhd.chain_paths(p["leaf"])
        data = vhd.read(p["leaf"], 0, 4 * MiB)
        out["read_ok"] = data == b"\x5a" * (2 * MiB) + b"\xa5" * MiB + bytes(MiB)
        # reparent the leaf onto the base (what a delete of the mid image does)
        vhd.set_parent(p["leaf"], p["base"])
        locs, _ = _locators(p["leaf"])
        out["reparented"] = {"locators": locs,
                             "query_p": h.run("query", "-n", p["leaf"], "-p"),
                             "check_p": h.run("check", "-n", p["leaf"], "-p")}
        vhd.set_parent(p["leaf"], p["mid"])
        out["tapdisk"] = _tapdisk_open_pause_reopen(p["leaf"])
        # detached: every LV inactive but the leaf (read its locators), then walk
        for k in ("mid", "base"):
            lvm.activate(h.vg, names[k], False)
        assert not os.path.exists("/dev/mapper/" + out["mapper"]["mid"])
        out["inactive_parent"] = vhd_storage._parent_lv(p["leaf"])
        act = vhd_storage.Activation()
        act.begin(p["leaf"])
        out["activated_chain"] = vhd.chain_paths(p["leaf"])
        act.end([p["leaf"]])
        return out
    finally:
        h.close()


# the bytes of a new VHD that differ by nature: the footer's time stamp, checksum and UUID
# (at 0 and at the device's end), the header's checksum and parent time stamp
FOOTER_MASK = [(24, 28), (64, 84)]
HEADER_MASK = [(512 + 36, 512 + 40), (512 + 56, 512 + 60)]


def _masked(data, ranges):
    b = bytearray(data)
    for lo, hi in ranges:
        b[lo:hi] = bytes(hi - lo)
    return bytes(b)


def _head_and_tail(path, n=8 * MiB):
    with open(path, "rb") as f:
        head = f.read(n)
        f.seek(-512, os.SEEK_END)
        tail = f.read(512)
    return _masked(head, FOOTER_MASK + HEADER_MASK), _masked(tail, FOOTER_MASK)


def _differences(a, b):
    out = []
    for part, x, y in zip(("head", "tail"), _head_and_tail(a), _head_and_tail(b)):
        if x != y:
            first = next(i for i in range(min(len(x), len(y))) if x[i] != y[i]) \
                if len(x) == len(y) else "length %d != %d" % (len(x), len(y))
            out.append("%s differs at %s" % (part, first))
    return out


def scenario_reserve():
    from livesnap.datapaths import vhd_storage
    from livesnap.tools import lvm
    h = HostLayout()
    try:
        cases = []
        for virtual_mb in (64, 3 * 1024 + 6):
            names = {k: "VHD-%s" % uuid.uuid4() for k in ("base", "leaf", "ref", "thin")}
            p = {k: h.path(v) for k, v in names.items()}
            full = lvm.full_size(virtual_mb * MiB)
            lvm.lvcreate(h.vg, names["base"], full)
            rc = h.run("create", "-n", p["base"], "-s", str(virtual_mb), "-S", str(MSIZE_MB))
            assert rc[0] == 0, rc
            st = vhd_storage.for_path(p["base"])
            st.create_child(p["leaf"], p["base"], leaf=True)
            lvm.lvcreate(h.vg, names["ref"], lvm.lv_size(h.vg, names["leaf"]))
            rc = h.run("snapshot", "-n", p["ref"], "-p", p["base"], "-S", str(MSIZE_MB))
            assert rc[0] == 0, rc
            st.create_child(p["thin"], p["base"], leaf=False)
            cases.append({
                "virtual": virtual_mb,
                "differences": _differences(p["leaf"], p["ref"]),
                "query_S": h.run("query", "-n", p["leaf"], "-S"),
                "check_p": h.run("check", "-n", p["leaf"], "-p"),
                "leaf_lv": lvm.lv_size(h.vg, names["leaf"]),
                "sm_full": sm_calc_size_vhd_lv(virtual_mb * MiB),
                "thin_lv": lvm.lv_size(h.vg, names["thin"]),
                "thin_check": h.run("check", "-n", p["thin"], "-p"),
                "thin_query_S": h.run("query", "-n", p["thin"], "-S"),
            })
            for k in ("thin", "ref", "leaf", "base"):
                lvm.lvremove(h.vg, names[k])
        return {"cases": cases}
    finally:
        h.close()


def sm_calc_size_vhd_lv(virtual):
    """SM 3.2.12 lvhdutil.calcSizeVHDLV, written out from its definition (vhdutil.
    calcOverheadEmpty(MSIZE) + calcOverheadBitmap(virtual), rounded up to 4 MiB), so the
    test does not take livesnap's own formula for it."""
    def roundup(div, n):
        return -(-n // div) * div
    msize_mb = MSIZE_MB
    over = roundup(512, 3 * 1024 + (msize_mb // 2) * 4)
    over = roundup(4096, over + (msize_mb // 2) // 8)
    bitmaps = -(-virtual // (2 * MiB)) * 4096
    return roundup(4 * MiB, virtual + over + bitmaps)


def lvm_name(vg, lv):
    from livesnap.vhd import paths
    return paths.mapper_name(vg, lv)


if __name__ == "__main__":
    result = globals()["scenario_" + sys.argv[1]](*sys.argv[2:])
    sys.stdout.write(json.dumps(result) + "\n")
