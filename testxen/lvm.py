"""An ``lvm`` multi-call command for tests: real LVM metadata, loop devices for activation.

Device-mapper does not run here, so LVM cannot activate an LV. This stand-in runs the real
``lvm`` (``$TESTXEN_REAL_LVM``, default ``/usr/sbin/lvm``) on a volume group whose physical
volume is a loop device over a sparse file, with ``global/activation=0``: names, sizes,
extents, free space, permissions and every refusal and error message are LVM's own. What
activation would give, a block device per LV at ``/dev/<vg>/<lv>``, is made after each
command from LVM's own report (``lvs``, keyed by the LV's UUID, which a rename keeps):

* a new LV gets a sparse data file of exactly its size and a loop device over it, a block
  device node ``<dev>/mapper/<vg>-<lv>`` (device-mapper's name: each ``-`` in VG and LV
  doubled) with the loop's device number, and the link ``<dev>/<vg>/<lv>`` -> that node, as
  LVM lays them out in XenServer's dom0 (no udev: LVM makes the ``/dev/mapper`` nodes and the
  ``/dev/<vg>/<lv>`` links itself). So libvhd, which resolves a VHD's parent locator relative
  to the real path of the child, looks in ``/dev/mapper`` as on a host;
* a renamed LV keeps its device, only the link moves (an open device stays valid, as with dm);
* a resized LV's file is truncated/extended and the loop's capacity re-read (``losetup -c``);
  data past a shrink is gone, as on LVM;
* ``lvchange -p r`` makes the device read-only (``blockdev --setro``): writes fail with EPERM;
* ``lvchange -an`` (``lvcreate -an``) removes the link (the LV has no device until
  ``lvchange -ay``), as SM leaves the LVs of a detached VDI;
* a removed LV loses its link, loop device and data.

``global/metadata_read_only`` (dom0's ``/etc/lvm/lvm.conf`` has it set: only the pool master
writes an SR's LVM metadata, with ``LVM_SYSTEM_DIR=/etc/lvm/master``) is enforced here as
XenServer's LVM (2.02) enforces it: a command that would write metadata is refused with its
message ("Operation prohibited while global/metadata_read_only is set.", rc 5) and changes
nothing; reads and activation run. The setting is read from ``$LVM_SYSTEM_DIR/lvm.conf``,
as the real LVM reads it; this LVM (2.03) reads the key but no longer enforces it.
``dom0_conf`` writes such a pair of configurations for a test.

So a VHD on such an LV has a real block device's fixed size (its footer at the device's end,
no growth past it), which is what a bug in inflate/deflate would run into.

Usage: ``$LVM <lvcreate|lvrename|lvresize|lvremove|lvchange|lvs|vgs> ARGS`` (as ``lvm``), or
``testxen/lvm-bin/<command> ARGS`` (links named as LVM's commands in ``/usr/sbin``, for SM's
``lvutil`` and libvhd's ``lvm-util``, which run them by name).
State lives in ``$TESTXEN_LVM_ROOT`` (``make_vg`` creates it); links go under
``$TESTXEN_LVM_DEV`` (default ``/dev``).
"""
import fcntl
import json
import os
import re
import stat
import subprocess
import sys

REAL_LVM = "/usr/sbin/lvm"
COMMANDS = ("lvcreate", "lvrename", "lvresize", "lvextend", "lvreduce", "lvremove", "lvchange",
            "lvs", "vgs", "pvs", "lvdisplay")
READ_ONLY = ("lvs", "vgs", "pvs", "lvdisplay")
NOISE = ("Activation disabled", "Skipping zeroing", "not zeroed", "leaked on")


def real_lvm():
    return os.environ.get("TESTXEN_REAL_LVM") or REAL_LVM


def dev_root():
    return os.environ.get("TESTXEN_LVM_DEV") or "/dev"


def _config(pv_dev):
    return ('global { activation = 0 } devices { filter = [ "a|^%s$|", "r|.*|" ] '
            'obtain_device_list_from_udev = 0 }' % pv_dev)


class Vg(object):
    """One volume group of the stand-in, kept in ``root``."""

    def __init__(self, root):
        self.root = root
        with open(os.path.join(root, "vg.json")) as f:
            meta = json.load(f)
        self.name, self.pv_file, self.pv_dev = meta["vg"], meta["pv_file"], meta["pv_dev"]
        self.state_path = os.path.join(root, "lvs.json")

    def lvm(self, cmd, args, check=False):
        argv = [real_lvm(), cmd, "--config", _config(self.pv_dev)] + list(args)
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        err = "".join(line + "\n" for line in p.stderr.splitlines()
                      if not any(n in line for n in NOISE))
        if check and p.returncode:
            raise RuntimeError("%s: %s" % (" ".join(argv), err))
        return p.returncode, p.stdout, err

    def _state(self):
        try:
            with open(self.state_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def _save(self, state):
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.rename(tmp, self.state_path)

    def report(self):
        _, out, _ = self.lvm("lvs", ["--reportformat", "json", "--units", "b", "--nosuffix",
                                     "-o", "lv_uuid,lv_name,lv_size,lv_attr", self.name],
                             check=True)
        return json.loads(out)["report"][0]["lv"]

    def link(self, name):
        return os.path.join(dev_root(), self.name, name)

    def mapper(self, name):
        return os.path.join(dev_root(), "mapper", dm_name(self.name, name))

    def _link_up(self, name, loop):
        """The dm node (a block device node of the loop's number) and the VG link to it."""
        node, link = self.mapper(name), self.link(name)
        os.makedirs(os.path.dirname(node), exist_ok=True)
        for tmp, make in ((node + ".tmp", lambda t: os.mknod(
                t, stat.S_IFBLK | 0o660, os.stat(loop).st_rdev)),
                          (self.link(".%s.tmp" % name), lambda t: os.symlink(node, t))):
            if os.path.lexists(tmp):
                os.unlink(tmp)
            make(tmp)
        os.rename(node + ".tmp", node)
        os.rename(self.link(".%s.tmp" % name), link)

    def _link_down(self, name, loop):
        _unlink_if_to(self.link(name), self.mapper(name))
        try:
            if os.stat(self.mapper(name)).st_rdev == os.stat(loop).st_rdev:
                os.unlink(self.mapper(name))
        except OSError:
            pass

    def sync(self, activate=None):
        """Make links, loop devices and data files follow LVM's metadata; ``activate``
        {lv name: bool} records activation changes (LVM with activation disabled keeps
        none): an inactive LV keeps its data and loop device but has no link, as an LV
        without its dm device."""
        state = self._state()
        activate = activate or {}
        seen = set()
        os.makedirs(os.path.join(dev_root(), self.name), exist_ok=True)
        for lv in self.report():
            uuid, name, size = lv["lv_uuid"], lv["lv_name"], int(lv["lv_size"])
            readonly = lv["lv_attr"][1] == "r"
            seen.add(uuid)
            ent = state.get(uuid)
            if ent is None:
                data = os.path.join(self.root, "data", uuid)
                os.makedirs(os.path.dirname(data), exist_ok=True)
                with open(data, "wb") as f:
                    f.truncate(size)
                loop = _losetup(["-f", "--show", data]).strip()
                # the read-only flag of a loop device outlives its detach: clear it
                subprocess.run(["blockdev", "--setrw", loop], check=True)
                ent = state[uuid] = {"name": None, "loop": loop, "data": data, "size": size,
                                     "readonly": False, "active": True}
            if name in activate:
                ent["active"] = activate[name]
            if ent["size"] != size:
                with open(ent["data"], "r+b") as f:
                    f.truncate(size)
                _losetup(["-c", ent["loop"]])
                ent["size"] = size
            if ent["readonly"] != readonly:
                subprocess.run(["blockdev", "--setro" if readonly else "--setrw", ent["loop"]],
                               check=True)
                ent["readonly"] = readonly
            linked = ent["name"] is not None and os.path.islink(self.link(ent["name"]))
            if ent["name"] != name or linked != ent.get("active", True):
                if ent["name"] is not None:
                    self._link_down(ent["name"], ent["loop"])
                if ent.get("active", True):
                    self._link_up(name, ent["loop"])
                ent["name"] = name
        for uuid in [u for u in state if u not in seen]:
            ent = state.pop(uuid)
            self._link_down(ent["name"], ent["loop"])
            subprocess.run(["blockdev", "--setrw", ent["loop"]])
            _losetup(["-d", ent["loop"]], check=False)
            try:
                os.unlink(ent["data"])
            except FileNotFoundError:
                pass
        self._save(state)

    def run(self, cmd, args):
        """One command, under the stand-in's lock; then activation follows the metadata."""
        with open(os.path.join(self.root, "lock"), "w") as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)
            if writes_metadata(cmd, args) and metadata_read_only():
                return 5, "", "  %s\n" % READ_ONLY_MESSAGE
            rc, out, err = self.lvm(cmd, args)
            if cmd not in READ_ONLY and rc == 0:       # a refused command changed nothing
                # another pool host's activation (TESTXEN_LVM_OTHER_HOST, testxen/sm_hosts.py)
                # acts on that host's device views, which this machine does not have
                self.sync({} if os.environ.get("TESTXEN_LVM_OTHER_HOST")
                          else _activation(cmd, args, self.name))
            return rc, out, err

    def loops(self):
        return {e["name"]: e["loop"] for e in self._state().values()}


READ_ONLY_MESSAGE = "Operation prohibited while global/metadata_read_only is set."


def metadata_read_only():
    """``global/metadata_read_only`` of ``$LVM_SYSTEM_DIR/lvm.conf`` (default /etc/lvm), the
    file the real LVM reads; read here rather than by ``lvm dumpconfig`` (a process, ~15 ms,
    on every write: the Xen benchmarks time LVM commands inside pauses)."""
    path = os.path.join(os.environ.get("LVM_SYSTEM_DIR") or "/etc/lvm", "lvm.conf")
    try:
        with open(path) as f:
            text = "".join(line.split("#", 1)[0] + "\n" for line in f)
    except OSError:
        return False
    found = re.findall(r"\bmetadata_read_only\s*=\s*(\d+)", text)
    return bool(found) and found[-1] != "0"


def writes_metadata(cmd, args):
    """The command changes LVM metadata (an ``lvchange`` only of activation or a refresh
    does not)."""
    if cmd in READ_ONLY:
        return False
    if cmd != "lvchange":
        return True
    changes = [a for a in args if a.startswith("-") and not a.startswith("-a")
               and a not in ("--activate", "--refresh", "-f", "--force", "-y", "--yes")]
    return bool(changes)


def dom0_conf(root):
    """dom0's LVM configurations under ``root``, as SM's package leaves them (sm.spec
    ``%post``): ``root/lvm.conf`` with ``metadata_read_only = 1`` (``/etc/lvm``) and
    ``root/master/lvm.conf`` writable (``/etc/lvm/master``). Returns (default, master)."""
    master = os.path.join(root, "master")
    os.makedirs(master, exist_ok=True)
    for d, ro in ((root, 1), (master, 0)):
        with open(os.path.join(d, "lvm.conf"), "w") as f:
            f.write("global {\n\tmetadata_read_only = %d\n}\nbackup {\n\tbackup = 0\n"
                    "\tarchive = 0\n}\n" % ro)
    return root, master


def _activation(cmd, args, vg):
    """{lv name: active} that ``lvcreate -an`` / ``lvchange -a y|n VG/LV`` (or the LV's
    path ``/dev/VG/LV``, as SM's lvutil names it) asked for."""
    want = None
    for i, a in enumerate(args):
        if a in ("-a", "--activate") and i + 1 < len(args):
            want = args[i + 1]
        elif a.startswith("-a") and len(a) > 2 and a[2:] in ("y", "n", "ay", "ly", "ey"):
            want = a[2:]
    if want is None:
        return {}
    active = want != "n"
    if cmd == "lvcreate" and "-n" in args:
        return {args[args.index("-n") + 1]: active}
    if cmd == "lvchange":
        dev = os.path.join(dev_root(), vg) + "/"
        names = [a[len(dev):] if a.startswith(dev) else a.split("/", 1)[1]
                 for a in args if a.startswith(dev) or a.startswith(vg + "/")]
        return {n: active for n in names}
    return {}


def dm_name(vg, lv):
    """device-mapper's name of an LV: ``VG_XenStorage-x`` / ``VHD-y`` ->
    ``VG_XenStorage--x-VHD--y``."""
    return "%s-%s" % (vg.replace("-", "--"), lv.replace("-", "--"))


def _unlink_if_to(link, target):
    try:
        if os.readlink(link) == target:
            os.unlink(link)
    except OSError:
        pass


def _losetup(args, check=True):
    p = subprocess.run(["losetup"] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    if check and p.returncode:
        raise RuntimeError("losetup %s: %s" % (" ".join(args), p.stderr))
    return p.stdout


def make_vg(root, vg, size):
    """A volume group ``vg`` of ``size`` bytes (sparse) for the stand-in, kept in ``root``."""
    os.makedirs(root, exist_ok=True)
    pv_file = os.path.join(root, "pv.img")
    with open(pv_file, "wb") as f:
        f.truncate(size)
    pv_dev = _losetup(["-f", "--show", pv_file]).strip()
    subprocess.run(["blockdev", "--setrw", pv_dev], check=True)    # (see Vg.sync)
    with open(os.path.join(root, "vg.json"), "w") as f:
        json.dump({"vg": vg, "pv_file": pv_file, "pv_dev": pv_dev}, f)
    v = Vg(root)
    try:
        v.lvm("vgcreate", ["-s", "4m", vg, pv_dev], check=True)
        v.sync()
    except BaseException:
        v.lvm("vgremove", ["-f", vg])
        _losetup(["-d", pv_dev], check=False)      # no loop device left behind
        raise
    return v


def destroy_vg(root):
    """Remove every LV (links, loops, data), the VG, the PV and its loop device."""
    v = Vg(root)
    for ent in v._state().values():
        v._link_down(ent["name"], ent["loop"])
        subprocess.run(["blockdev", "--setrw", ent["loop"]])
        _losetup(["-d", ent["loop"]], check=False)
    v.lvm("vgremove", ["-f", v.name])
    v.lvm("pvremove", ["-f", v.pv_dev])
    _losetup(["-d", v.pv_dev], check=False)
    try:
        os.rmdir(os.path.join(dev_root(), v.name))
    except OSError:
        pass
    subprocess.run(["rm", "-rf", root])


def libvhd_report(vg, cmd, args):
    """What libvhd's ``lvm-util`` (``vhd-util scan -l VG``) asks LVM for, answered for the
    stand-in, or None for any other query. libvhd reads an LV's VHD metadata straight from
    the PV, at the LV's first segment (``vgs -o ...,pv_name,pe_start``; ``lvs -o
    ...,devices``), so it reads inactive LVs too. Here an LV's data is its own loop device,
    so the report names each LV's loop device as a PV of the VG with its data at extent 0:
    libvhd then reads exactly the LV's bytes, active or not."""
    opts = [a for a in args if a.startswith("--options=")]
    if not opts or not ("pe_start" in opts[0] or "devices" in opts[0]):
        return None
    rc, out, err = vg.lvm("vgs", ["--noheadings", "--nosuffix", "--units=b",
                                  "--options=vg_extent_size", vg.name])
    if rc:
        return rc, out, err
    extent = out.split()[0]
    lvs = sorted((e["name"], e["loop"], e["size"]) for e in vg._state().values())
    if cmd == "vgs":
        lines = ["  %s %s %d %d %s 0\n" % (vg.name, extent, len(lvs), len(lvs), loop)
                 for _, loop, _ in lvs]
    else:
        lines = ["  %s %d linear 1 0 %d %s(0)\n" % (name, size, size, loop)
                 for name, loop, size in lvs]
    return 0, "".join(lines), ""


def main(argv):
    if os.path.basename(argv[0]) in COMMANDS:        # testxen/lvm-bin/<cmd>: as /usr/sbin/<cmd>
        argv = [argv[0], os.path.basename(argv[0])] + list(argv[1:])
    if len(argv) < 2 or argv[1] not in COMMANDS:
        sys.stderr.write("usage: lvm {%s} ARGS\n" % "|".join(COMMANDS))
        return 2
    root = os.environ.get("TESTXEN_LVM_ROOT")
    if not root:
        sys.stderr.write("TESTXEN_LVM_ROOT is not set\n")
        return 5
    vg = Vg(root)
    report = libvhd_report(vg, argv[1], argv[2:]) if argv[1] in ("vgs", "lvs") else None
    rc, out, err = report or vg.run(argv[1], argv[2:])
    sys.stdout.write(out)
    sys.stderr.write(err)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
