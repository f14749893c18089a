"""LVHD chains livesnap makes, reached as on a XAPI host and read by the real blktap vhd-util.

On a host an LVHD image is ``/dev/VG_XenStorage-<sr>/VHD-<vdi>``, a link to the device that
``/dev/mapper/VG_XenStorage--<sr>-VHD--<vdi>`` also links to, and libvhd resolves a parent
locator against the ``/dev/mapper`` name (livesnap/vhd/paths.py). Device-mapper does not run
here, so each test runs in a private mount namespace (``unshare -m``) with an overlay over
/dev: the LVM stand-in (testxen/lvm.py: real LVM metadata, loop devices) makes
``/dev/<vg>/<lv>`` -> ``/dev/loopN``, and this file's ``lvm`` wrapper adds
``/dev/mapper/<dm name>`` -> the same loop device after every LVM command, as udev does. The
real ``vhd-util`` (the blktap build of scripts/build-blktap.sh; a missing build fails) then
sees what it sees on a host.

The scenario runs in the namespace (``python this-file SCENARIO``) and prints facts as JSON;
the tests assert on them.
"""
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20
MSIZE_MB = 2 * 1024 * 1024          # SM lvhdutil.MSIZE_MB


def blktap_prefix():
    """The blktap build scripts/build-blktap.sh made (its cache key: the archive's sha256)."""
    shared = os.environ.get("LIVESNAP_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
    found = glob.glob(os.path.join(shared, "upstream", "blktap-*.tar.gz"))
    assert len(found) == 1, "no blktap archive in %s/upstream" % shared
    h = hashlib.sha256()
    with open(found[0], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    cache = os.environ.get("LIVESNAP_CACHE") or "/var/cache/livesnap"
    p = os.path.join(cache, "blktap-%s" % h.hexdigest())
    assert os.path.exists(os.path.join(p, "bin", "vhd-util")), \
        "no blktap build at %s: run scripts/build-blktap.sh (make test does)" % p
    return p


def run_in_namespace(scenario, *args):
    """Run ``scenario`` of this file in a private mount namespace; its JSON result."""
    env = dict(os.environ, PYTHONPATH=ROOT, LIVESNAP_TEST_BLKTAP=blktap_prefix())
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
    # a delete's reparent (set_parent) writes the same form: the leaf now on the base
    assert r["reparented"]["locators"] == ["./" + m["base"]] * 3
    assert r["reparented"]["query_p"] == [0, "/dev/mapper/" + m["base"]]
    assert r["reparented"]["check_p"][0] == 0, r["reparented"]["check_p"]
    # the chain of a detached VDI (LVs inactive: no device, no /dev/mapper name) is walked
    # by the LV names the locators give (Activation)
    assert r["inactive_parent"] == "/dev/%s/%s" % (vg, r["lvs"][1])
    assert r["activated_chain"] == r["chain"]


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


# --- the namespace side --------------------------------------------------------------------

LVM_WRAPPER = r'''#!%(python)s
"""The LVM stand-in, then /dev/mapper/<dm name> -> the loop device of every LV that has a
device (as udev links dm devices), links of gone LVs removed."""
import os, sys
sys.path.insert(0, %(root)r)
from testxen import lvm
from livesnap.vhd import paths
rc = lvm.main(sys.argv)
want = {}
for vg in os.listdir("/dev"):
    d = os.path.join("/dev", vg)
    if not vg.startswith("VG_") or not os.path.isdir(d):
        continue
    for lv in os.listdir(d):
        if os.path.islink(os.path.join(d, lv)) and not lv.startswith("."):
            want[paths.mapper_name(vg, lv)] = os.readlink(os.path.join(d, lv))
for name in os.listdir("/dev/mapper"):
    if want.get(name) != os.readlink(os.path.join("/dev/mapper", name)):
        os.unlink(os.path.join("/dev/mapper", name))
for name, target in want.items():
    if not os.path.lexists(os.path.join("/dev/mapper", name)):
        os.symlink(target, os.path.join("/dev/mapper", name))
sys.exit(rc)
'''


class HostLayout(object):
    """In the namespace: /dev overlaid, a VG of the LVM stand-in with /dev/mapper links."""

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
        wrapper = os.path.join(self.tmp, "lvm")
        with open(wrapper, "w") as f:
            f.write(LVM_WRAPPER % {"python": sys.executable, "root": ROOT})
        os.chmod(wrapper, 0o755)
        self.root = os.path.join(self.tmp, "vg")
        os.environ["TESTXEN_LVM_ROOT"] = self.root
        os.environ["LVM"] = wrapper
        from testxen import lvm as standin
        self.sr = str(uuid.uuid4())
        self.vg = "VG_XenStorage-%s" % self.sr
        standin.make_vg(self.root, self.vg, 4 << 30)
        self.vhd_util = os.path.join(os.environ["LIVESNAP_TEST_BLKTAP"], "bin", "vhd-util")

    def path(self, lv):
        return "/dev/%s/%s" % (self.vg, lv)

    def run(self, *args):
        p = subprocess.run([self.vhd_util] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True)
        return [p.returncode, p.stdout.strip()]

    def close(self):
        from testxen import lvm as standin
        standin.destroy_vg(self.root)


def _locators(path):
    from livesnap import vhd
    with vhd.open_image(path, chain=False) as img:
        return [text for _, _, text in img.parent_locators()], img.header.parent_name


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


def lvm_name(vg, lv):
    from livesnap.vhd import paths
    return paths.mapper_name(vg, lv)


if __name__ == "__main__":
    result = globals()["scenario_" + sys.argv[1]](*sys.argv[2:])
    sys.stdout.write(json.dumps(result) + "\n")
