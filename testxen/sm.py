"""The real storage manager's code (xapi-project/sm, ``../shared/upstream/sm-*.tar.gz``) run
over an SR the tests made, as XAPI runs it on a host: its scan and its garbage collector
(``drivers/cleanup.py``) with their own logic, the real ``vhd-util`` (``vhdutil.VHD_UTIL``)
for every VHD read and write, and their XAPI calls served by the XAPI stand-in
(``testxen/xapi.py``).

SM is never copied into the project: the archive is unpacked once per checksum into a cache
(``$LIVESNAP_CACHE``, default ``/var/cache/livesnap``, ``sm-<sha256>/``) and imported from
there. Each SM action runs in its own Python process (``python -m testxen.sm CONFIG ACTION``),
so SM's module globals (GC locks, the loop's state) start fresh as in SM's own GC process
(``/usr/libexec/sm/cleanup -g -u <sr>``). What is changed in that process, and why:

* ``XenAPI.xapi_local()`` (SM's session to the local xapi, ``/var/lib/xcp/xapi``) connects to
  the stand-in's UNIX socket instead;
* ``util.get_this_host()`` (reads ``INSTALLATION_UUID`` from ``/etc/xensource-inventory``)
  returns the stand-in's host uuid;
* ``util.SMlog`` (syslog) appends to a log file the tests show when they fail;
* SM's state directories, fixed paths on a host, live under the test's directory:
  ``lock.Lock.BASE_DIR`` (``/var/lock/sm``: the same directory livesnap's SM lock uses in the
  test, ``LIVESNAP_SM_LOCK_DIR``, so SM and livesnap exclude each other as on a host),
  ``ipc.IPCFlag.BASE_DIR``, ``refcounter.RefCounter.BASE_DIR``, ``cleanup.NON_PERSISTENT_DIR``
  and the speed log (``/var/run/<sr>.speed_log``);
* a file SR's directory is the stand-in's (``cleanup.FileSR.path`` is
  ``/var/run/sr-mount/<sr>`` on a host, a mount point);
* blktap's tools are found under the build's prefix (``vhdutil.VHD_UTIL``,
  ``blktap2.TapCtl.PATH``, ``SR.TAPDISK_UTIL``, and PATH for SM's bare ``vhd-util`` calls),
  not in ``/usr/bin``/``/usr/sbin``;
* ``cleanup.VDI.POLL_INTERVAL`` (1 s: how often the GC polls its forked coalesce) is 0.05 s,
  so each coalesce does not cost a second; no decision depends on it.

SM's ``lvutil._lvmBugCleanup`` runs the real ``dmsetup``, which finds no device-mapper in
this kernel, and removes what it takes for leftovers of a deactivated LV (its
``/dev/mapper`` node and ``/dev/<vg>/<lv>`` link), as it would on a host.

SM's driver ``vdi_delete`` (``FileVDI.delete`` / ``LVHDVDI.delete``: what xapi's
``VDI.destroy`` runs, ``Sm.destroyer`` for the stand-in's ``vdi_destroyer``) runs on SR and
VDI objects made as SRCommand makes them, under SM's SR lock; its ``_kickGC`` (``systemctl
start SMGC@<sr>`` on a host) is recorded instead (``Sm.kicks``), and the test runs the GC
where it chooses: to its end (``gc``) or as the SMGC service does, quiet period first
(``gc-quiet``, ``Sm.start``: a process left running, which SM's abort flag ends).
``util.sr_get_capability`` (xapi's ``SM`` record of the SR type, which xapi fills from the
driver's ``DRIVER_INFO``) returns the driver's own ``CAPABILITIES``.

Everything else (which VHDs are coalesceable, leaf-coalesceable, garbage; the coalesce,
relink, rename, hide, journal and XAPI record steps of a GC pass) is SM's code unchanged.

Pausing: SM pauses a VDI through ``host.call_plugin(host, "tapdisk-pause", ...)`` on every
host listed in the VDI's ``sm_config`` as ``host_<ref>``; a VDI with no such key is not
attached and its pause is only the ``paused`` key (blktap2.VDI.tap_pause). Every host's
plugin, this one (the master) included, is SM's own ``drivers/tapdisk-pause`` run by
testxen/sm_hosts.py (``master`` for this host, ``Host`` for another), one Python process per
call as xapi runs a plugin (action ``host-plugin``), with the bookkeeping of blktap's kernel
side an SM attach leaves supplied for the VDIs a test attaches (``Host.plug``: the tap device
naming the image, its minor that of the real tapdisk serving it): a VDI without it is "not
attached on this host" to the plugin, as on a host.
"""
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def upstream_dir():
    shared = os.environ.get("LIVESNAP_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
    return os.path.join(shared, "upstream")


def archive():
    found = sorted(glob.glob(os.path.join(upstream_dir(), "sm-*.tar.gz")))
    if len(found) != 1:
        raise RuntimeError("expected one sm-*.tar.gz in %s, found %d"
                           % (upstream_dir(), len(found)))
    return found[0]


def unpack(cache_root=None):
    """The unpacked SM tree (holding ``drivers/``), unpacked once per archive checksum."""
    path = archive()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    cache_root = cache_root or os.environ.get("LIVESNAP_CACHE") or "/var/cache/livesnap"
    dest = os.path.join(cache_root, "sm-" + h.hexdigest())
    if os.path.isdir(os.path.join(dest, "drivers")):
        return dest
    os.makedirs(cache_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".sm-", dir=cache_root)
    try:
        with tarfile.open(path) as t:
            t.extractall(tmp)
        top, = [d for d in os.listdir(tmp) if os.path.isdir(os.path.join(tmp, d))]
        try:
            os.rename(os.path.join(tmp, top), dest)
        except OSError:
            if not os.path.isdir(os.path.join(dest, "drivers")):   # not a concurrent winner
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


class SmError(Exception):
    def __init__(self, action, rc, out, err, log):
        Exception.__init__(self, "SM %s failed (rc %s):\n%s\n%s\n--- SMlog (tail) ---\n%s"
                           % (action, rc, out[-2000:], err[-4000:], log[-6000:]))
        self.action, self.rc, self.out, self.err, self.log = action, rc, out, err, log


class Sm(object):
    """SM's code for one test: ``state`` is a private directory (locks may be shared, see
    ``lock_dir``); ``xapi`` the stand-in (its socket path in ``socket``)."""

    def __init__(self, tree, vhd_util, xapi, socket, state, lock_dir=None):
        self.tree = tree
        self.vhd_util = vhd_util
        self.xapi = xapi
        self.socket = socket
        self.state = state
        self.lock_dir = lock_dir or os.path.join(state, "lock")
        self.log_path = os.path.join(state, "SMlog")
        os.makedirs(state, exist_ok=True)

    @property
    def refcount_dir(self):
        """SM's refcount files (``RefCounter.BASE_DIR``): livesnap's
        (``$LIVESNAP_SM_REFCOUNT_DIR``) where the test set it, so both keep the same counts
        as on a host."""
        return os.environ.get("LIVESNAP_SM_REFCOUNT_DIR") or os.path.join(self.state, "refcount")

    def config(self, sr):
        rec = self.xapi.record("SR", sr)
        host = self.xapi.record("host", self.xapi.host)["uuid"]
        return {"tree": self.tree, "vhd_util": self.vhd_util, "socket": self.socket,
                "host_uuid": host, "state": self.state, "lock_dir": self.lock_dir,
                "log": self.log_path, "sr_uuid": rec["uuid"], "sr_type": rec["type"],
                "sr_path": self.xapi.sr_dir(sr), "refcount_dir": self.refcount_dir,
                "lvm_master": os.environ.get("LIVESNAP_LVM_MASTER_DIR")}

    def log(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def run(self, action, sr, *args, timeout=300, extra=None, **fields):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in sys.path if p])
        cfg = dict(self.config(sr), **(extra or {}))
        cfg.update(fields)
        p = subprocess.run([sys.executable, "-m", "testxen.sm", json.dumps(cfg),
                            action] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, env=env, timeout=timeout, cwd=ROOT)
        if p.returncode != 0:
            raise SmError(action, p.returncode, p.stdout, p.stderr, self.log())
        return json.loads(p.stdout.strip().splitlines()[-1])

    def start(self, action, sr, **extra):
        """``action`` in a process of its own, not waited for (a ``Popen``)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in sys.path if p])
        cfg = self.config(sr)
        cfg.update(extra)
        return subprocess.Popen([sys.executable, "-m", "testxen.sm", json.dumps(cfg), action],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, env=env, cwd=ROOT)

    def scan(self, sr):
        """SM's own SR scan (FileSR / LVHDSR ``_loadvdis``): {uuid: {parent, hidden,
        read_only}} of the VDIs SM would introduce to XAPI (hidden leaves left out, as SM
        does)."""
        return self.run("scan", sr)

    def classify(self, sr):
        """The GC's view (cleanup.SR scan, no action): every VHD with its parent, hidden
        flag and children; what ``isCoalesceable``, ``isLeafCoalesceable`` (with
        ``gatherLeafCoalesceable``'s filters and the SR's coalesce/leaf-coalesce switches)
        and ``findGarbage`` return."""
        return self.run("classify", sr)

    def lvhd_init(self, sr):
        """The SR's MGT volume, as SM's LVHDSR makes it (see ``_lvhd_init``)."""
        return self.run("lvhd-init", sr)

    def attach(self, sr, vdi_uuid):
        """LVHD: SM's refcounts and activation of a VDI's attach on this host, the master
        (LVHDVDI._attach: ``_chainSetActive(True, True, True)``: the leaf's binary count,
        one normal count on each image under it, through SM's LVActivator/LVMCache/RefCounter
        over the chain SM reads, ``vhdutil.getParentChain``). Returns ``refcounts``."""
        return self.run("attach", sr, vdi_uuid)

    def detach(self, sr, vdi_uuid):
        """LVHD: SM's detach of a VDI (LVHDVDI._detach: ``_chainSetActive(False, True)``
        over the chain as it is now, then ``deactivateAll``). Returns ``refcounts``."""
        return self.run("detach", sr, vdi_uuid)

    def refcounts(self, sr):
        """LVHD: {VDI uuid: [count, binary count]} of SM's namespace ``lvm-<sr>``, read by
        SM's ``RefCounter.check``."""
        return self.run("refcounts", sr)

    def fix_refcounts(self, sr):
        """LVHD: what SM's ``lvhdutil.setInnerNodeRefcounts`` (run on a new pool master,
        ``lvhdutil.py fixrefcounts``) makes of the refcounts: every hidden image's normal
        count rebuilt from the attached leaves above it; it asserts that no visible image has
        a normal count. Returns ``refcounts`` after it."""
        return self.run("fixrefcounts", sr)

    def cbt(self, sr, op, log_dir, vdi_uuid, cbt_util, snapshot_uuid=None, consistent=None,
            size=None, lvhd=False):
        """SM's own CBT log steps on the logs in ``log_dir`` (see ``_sm_cbt``): ``op``
        "snapshot" (``VDI._cbt_snapshot(snapshot_uuid, consistent)`` of VDI ``vdi_uuid``, a
        disk of ``size`` bytes), "delete" (``VDI.delete``'s CBT part for VDI ``vdi_uuid``) or
        "clone" (SM's ``clone`` of VDI ``vdi_uuid``, FileVDI's or with ``lvhd`` LVHDVDI's,
        down to ``_snapshot``, whose arguments are returned as "snapshot_calls").
        Returns {"paused": [the VDI uuids SM paused around its coalesce or clone]}."""
        return self.run("cbt", sr, extra={"cbt": {
            "op": op, "dir": log_dir, "vdi_uuid": vdi_uuid, "snapshot_uuid": snapshot_uuid,
            "consistent": consistent, "size": size, "cbt_util": cbt_util, "lvhd": lvhd}})

    def vdi_delete(self, sr, vdi_ref):
        """SM's driver ``vdi_delete`` of a VDI (``FileVDI.delete`` / ``LVHDVDI.delete``), as
        xapi runs it for ``VDI.destroy`` (``xe vdi-destroy``, ``xe snapshot-uninstall``):
        under SM's SR lock, as SRCommand runs it. Its ``_kickGC`` (on a host:
        ``systemctl start SMGC@<sr>``) is recorded instead: the test runs the GC where it
        chooses (``gc``). Returns {"kicked": True/False}."""
        rec = self.xapi.record("VDI", vdi_ref)
        return self.run("vdi-delete", sr, vdi_uuid=rec["uuid"], vdi_ref=vdi_ref)

    def destroyer(self):
        """A ``VDI.destroy`` handler for the XAPI stand-in (``xapi.vdi_destroyer``): SM's
        real ``vdi_delete``; ``kicks`` lists the SR refs whose GC SM kicked."""
        def destroy(vdi_ref):
            sr = self.xapi.record("VDI", vdi_ref)["SR"]
            if self.vdi_delete(sr, vdi_ref)["kicked"]:
                self.kicks.append(sr)
        self.kicks = []
        return destroy

    def gc(self, sr):
        """One real GC run to its end (cleanup ``_gc(session, sr, dryRun=False,
        immediate=True)``: the loop the SMGC service runs, without the 5-minute quiet
        period), then ``classify`` of what it left."""
        return self.run("gc", sr)


class Blktap(object):
    """The real blktap under ``prefix`` (built by scripts/build-blktap.sh): ``vhd-util``, and
    ``tap-ctl``/``tapdisk`` serving an image over NBD for reads and writes (``qemu-img dd`` /
    ``qemu-io``, the QEMU NBD client), so data goes through libvhd's own chain resolution."""

    def __init__(self, prefix):
        """``vhd-util scan -l`` (libvhd's lvm-util) runs ``vgs``/``lvs`` by name: the LVM
        stand-in's (testxen/lvm-bin) come first on PATH."""
        self.prefix = prefix
        self.vhd_util = os.path.join(prefix, "bin", "vhd-util")
        self.tap_ctl_path = os.path.join(prefix, "sbin", "tap-ctl")
        shim = os.path.join(prefix, "lib", "memlock_shim.so")
        self.shim = shim if os.path.exists(shim) else None

    def env(self):
        env = dict(os.environ)                       # now: a test may have set LVM's root
        env["PATH"] = os.pathsep.join([os.path.join(ROOT, "testxen", "lvm-bin"),
                                       env.get("PATH", "")])
        if self.shim:                                # tapdisk's mlockall in a container
            env["LD_PRELOAD"] = self.shim
        return env

    def _run(self, argv, check=True):
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, env=self.env(), timeout=120)
        if check and p.returncode != 0:
            raise RuntimeError("%s: rc %d: %s %s" % (" ".join(argv), p.returncode, p.stdout,
                                                     p.stderr))
        return p

    def vhd(self, *args, check=True):
        return self._run([self.vhd_util] + [str(a) for a in args], check=check)

    def check(self, path):
        """``vhd-util check -n PATH -p`` (parent locators resolved: libvhd opens the
        parent by the child's locator). None if sound, else the tool's complaint."""
        p = self.vhd("check", "-n", path, "-p", check=False)
        return None if p.returncode == 0 else (p.stdout + p.stderr).strip()

    def parent(self, path):
        p = self.vhd("query", "-n", path, "-p", check=False)
        out = (p.stdout + p.stderr).strip()
        if p.returncode != 0:
            raise RuntimeError("vhd-util query -p %s: %s" % (path, out))
        return None if "has no parent" in out else out

    def _served(self, path, readonly):
        """A fresh real tapdisk on ``path``: (pid, minor), by testxen.blktap.spawn."""
        from testxen import blktap
        return blktap.spawn(path, readonly=readonly)

    def _close(self, pid, minor):
        """``tap-ctl destroy`` (SIGKILL and clean-up when it fails), by testxen.blktap."""
        from testxen import blktap
        blktap.destroy(pid, minor)

    def read(self, path):
        """The whole virtual disk as the real tapdisk reads it (chain resolved)."""
        pid, minor = self._served(path, True)
        try:
            fd, out = tempfile.mkstemp(prefix="tapread-")
            os.close(fd)
            try:
                self._run(["qemu-img", "dd", "-f", "raw", "-O", "raw",
                           "if=nbd+unix:///?socket=/run/blktap-control/nbd%d.%d" % (pid, minor),
                           "of=" + out, "bs=1M"])
                with open(out, "rb") as f:
                    return f.read()
            finally:
                if os.path.exists(out):
                    os.unlink(out)
        finally:
            self._close(pid, minor)

    def write(self, path, offset, length, pattern):
        """Write ``length`` bytes of ``pattern`` at ``offset`` through the real tapdisk."""
        pid, minor = self._served(path, False)
        try:
            self._run(["qemu-io", "-f", "raw", "-c",
                       "write -P %d %d %d" % (pattern, offset, length),
                       "nbd+unix:///?socket=/run/blktap-control/nbd%d.%d" % (pid, minor)])
        finally:
            self._close(pid, minor)


def file_layout(xapi, sr, blktap, size, base_writes, leaf_writes):
    """A chain on the file SR ``sr`` as SM's FileSR snapshots leave it once the snapshot VDIs
    are deleted: one hidden base copy (read-only, an unmanaged record) per entry of
    ``base_writes`` under the VDI's leaf, each made by ``vhd-util snapshot`` (FileSR._snapshot:
    the leaf linked to the base's name, snapshot, renamed over) after that entry's writes
    ([(offset, length, pattern)]) went through the real tapdisk; then ``leaf_writes`` into the
    leaf. Records as SM writes them. Returns (leaf VDI ref, [base uuids, oldest first])."""
    import uuid
    MiB = 1 << 20
    d = xapi.sr_dir(sr)
    leaf_uuid = str(uuid.uuid4())
    leaf = os.path.join(d, leaf_uuid + ".vhd")
    blktap.vhd("create", "-n", leaf, "-s", size // MiB)
    bases = []
    for writes in base_writes:
        for off, length, pattern in writes:
            blktap.write(leaf, off, length, pattern)
        b = str(uuid.uuid4())
        os.link(leaf, os.path.join(d, b + ".vhd"))
        blktap.vhd("snapshot", "-n", leaf + ".new", "-p", os.path.join(d, b + ".vhd"))
        os.rename(leaf + ".new", leaf)
        blktap.vhd("set", "-n", os.path.join(d, b + ".vhd"), "-f", "hidden", "-v", "1")
        bases.append(b)
    for off, length, pattern in leaf_writes:
        blktap.write(leaf, off, length, pattern)
    return records_as_sm(xapi, sr, size, leaf_uuid, bases), bases


def records_as_sm(xapi, sr, size, leaf_uuid, bases):
    """XAPI's records of a leaf over hidden base copies (oldest first) as SM writes them:
    base copies read-only and unmanaged, each ``sm_config`` ``vhd-parent`` its VHD parent.
    Returns the leaf's VDI ref."""
    parent = None
    for b in bases:
        sm_config = {"vdi_type": "vhd"}
        if parent:
            sm_config["vhd-parent"] = parent
        xapi.add_vdi(sr, size, uuid=b, location=b, name_label="base copy",
                     read_only=True, managed=False, sm_config=sm_config)
        parent = b
    return xapi.add_vdi(sr, size, uuid=leaf_uuid, location=leaf_uuid,
                        sm_config={"vdi_type": "vhd", "vhd-parent": parent})


# -- the SM process -----------------------------------------------------------------------------

def _setup(cfg):
    tree = cfg["tree"]
    sys.path[:0] = [os.path.join(tree, "drivers"), os.path.join(tree, "misc", "fairlock")]
    import XenAPI
    socket = cfg["socket"]

    def xapi_local():
        return XenAPI.Session("http://%s/" % socket.replace("/", "_"),
                              transport=XenAPI.UDSTransport())
    XenAPI.xapi_local = xapi_local

    import util
    log_path = cfg["log"]

    def smlog(message, ident="SM", priority=None, _open=open):
        with _open(log_path, "a") as f:
            for line in str(message).split("\n"):
                f.write("%.3f %s[%d] %s\n" % (time.time(), ident, os.getpid(), line))
    util.SMlog = smlog
    util.get_this_host = lambda: cfg["host_uuid"]

    state = cfg["state"]
    import lock
    import ipc
    import refcounter
    lock.Lock.BASE_DIR = cfg["lock_dir"]
    ipc.IPCFlag.BASE_DIR = os.path.join(state, "ipc")
    refcounter.RefCounter.BASE_DIR = cfg["refcount_dir"]
    import vhdutil
    vhdutil.VHD_UTIL = cfg["vhd_util"]
    # the rest of blktap's tools where SM expects them (/usr/sbin); some of SM's vhd-util
    # calls go by PATH ("vhd-util key", "vhd-util read"): PATH leads with the real blktap
    bindir = os.path.dirname(cfg["vhd_util"])
    sbindir = os.path.join(os.path.dirname(bindir), "sbin")
    os.environ["PATH"] = os.pathsep.join([bindir, sbindir, os.environ.get("PATH", "")])
    import SR
    import blktap2
    SR.TAPDISK_UTIL = os.path.join(sbindir, "td-util")
    blktap2.TapCtl.PATH = os.path.join(sbindir, "tap-ctl")
    # LVHD: SM runs LVM as /usr/sbin/<cmd>; here every LVM command goes to the LVM stand-in
    # (testxen/lvm.py: real LVM metadata, loop devices behind /dev/mapper nodes for
    # activation), and libvhd's own `lvs`/`vgs` (vhd-util scan -l) find it first on PATH.
    # SM serialises its LVM commands through the fairlock service (a systemd socket unit);
    # the stand-in serialises its commands itself, so that lock is a no-op here.
    wrappers = os.path.join(ROOT, "testxen", "lvm-bin")
    os.environ["PATH"] = wrappers + os.pathsep + os.environ["PATH"]
    import lvutil
    lvutil.LVM_BIN = wrappers
    # on the pool master SM's SR process runs LVM with the writable configuration
    # (SR.__init__: dconf SRmaster=true -> LVM_SYSTEM_DIR=/etc/lvm/master); a test's dom0
    # configuration (testxen.lvm.dom0_conf) has it elsewhere
    if cfg.get("other_host"):       # testxen/sm_hosts.py: its LV views are not this machine's
        os.environ["TESTXEN_LVM_OTHER_HOST"] = cfg["host_uuid"]
    if cfg.get("lvm_master"):
        lvutil.MASTER_LVM_CONF = cfg["lvm_master"]
        os.environ["LVM_SYSTEM_DIR"] = cfg["lvm_master"]

    class NoFairlock(object):
        def __init__(self, name):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    lvutil.Fairlock = NoFairlock
    import cleanup
    cleanup.NON_PERSISTENT_DIR = os.path.join(state, "nonpersistent")
    cleanup.VAR_RUN = state + "/"
    cleanup.SPEED_LOG_ROOT = os.path.join(state, "{uuid}.speed_log")
    cleanup.VDI.POLL_INTERVAL = 0.05
    import fjournaler
    orig_init = cleanup.FileSR.__init__

    def file_sr_init(self, uuid, xapi, createLock, force):
        orig_init(self, uuid, xapi, createLock, force)
        self.path = cfg["sr_path"]
        self.journaler = fjournaler.Journaler(self.path)
    cleanup.FileSR.__init__ = file_sr_init
    return cleanup


def _sm_scan(cfg):
    """FileSR._loadvdis / LVHDSR._loadvdis (the driver's scan: the VDIs SR.scan introduces)
    on an SR object made without SRCommand: only the fields _loadvdis and the VDI's load
    read (the SR attached on its master, not in legacy mode)."""
    if cfg["sr_type"] in ("lvm", "lvmoiscsi", "lvmohba"):
        import LVHDSR
        import lvhdutil
        import lvmcache
        from lvmanager import LVActivator
        sr = LVHDSR.LVHDSR.__new__(LVHDSR.LVHDSR)
        sr.uuid = cfg["sr_uuid"]
        sr.vgname = lvhdutil.VG_PREFIX + sr.uuid
        sr.path = os.path.join(lvhdutil.VG_LOCATION, sr.vgname)
        sr.lvmCache = lvmcache.LVMCache(sr.vgname)
        sr.lvActivator = LVActivator(sr.uuid, sr.lvmCache)
        sr.legacyMode = False
        sr.isMaster = True
    else:
        import FileSR
        sr = FileSR.FileSR.__new__(FileSR.FileSR)
        sr.uuid = cfg["sr_uuid"]
        sr.path = cfg["sr_path"]
    sr.vdis = {}
    sr.sr_ref = None
    sr.session = None
    class SrCommand(object):            # SRCommand's fields that FileVDI.load reads
        cmd = "sr_scan"
        params = {}
    import lock
    sr.srcmd = SrCommand()
    sr.o_direct = False
    sr.lock = lock.Lock("sr", sr.uuid)
    sr.cmd = "sr_scan"
    sr.sm_config = {}
    sr.dconf = {}
    sr.original_srcmd = None
    sr._loadvdis()
    out = {}
    for u, v in sr.vdis.items():
        out[u] = {"parent": v.parent or None, "hidden": bool(v.hidden),
                  "read_only": bool(v.read_only), "managed": not v.hidden,
                  "size": int(v.size), "utilisation": int(v.utilisation),
                  "is_a_snapshot": bool(getattr(v, "is_a_snapshot", False))}
    return out


def _vdi_delete(cfg):
    """The driver's ``vdi_delete`` on SR and VDI objects made as SRCommand makes them for
    it (``cmd`` vdi_delete, ``params`` with the VDI's ref and a session to the stand-in),
    under SM's SR lock (``SRCommand._run_locked``). ``_kickGC`` is recorded, not run.
    ``util.sr_get_capability`` (reads xapi's ``SM`` record of the SR type, which xapi fills
    from the driver's ``DRIVER_INFO``) returns the driver's own ``CAPABILITIES``."""
    import cleanup
    import util
    session = cleanup.XAPI.getSession()
    kicked = []
    try:
        lvhd = cfg["sr_type"] in ("lvm", "lvmoiscsi", "lvmohba")
        if lvhd:
            import LVHDSR as driver
            cls = driver.LVHDSR
        else:
            import FileSR as driver
            cls = driver.FileSR
        util.sr_get_capability = lambda sr_uuid, session=None: list(driver.CAPABILITIES)
        cls._kickGC = lambda self: kicked.append(self.uuid)

        sr = sr_object(cls, session, cfg["sr_uuid"], "vdi_delete",
                       {"vdi_ref": cfg["vdi_ref"], "vdi_uuid": cfg["vdi_uuid"]})
        if lvhd:
            _lvhd_sr_fields(sr)
        else:
            sr.path = cfg["sr_path"]
        sr.lock.acquire()
        try:
            vdi = sr.vdi(cfg["vdi_uuid"])
            vdi.session = session
            vdi.delete(sr.uuid, cfg["vdi_uuid"])
        finally:
            sr.lock.release()
    finally:
        session.xenapi.session.logout()
    return {"kicked": bool(kicked)}


def sr_object(cls, session, sr_uuid, cmd, params):
    """An SR object of SM's driver class ``cls`` for the command ``cmd`` with ``params``
    (the VDI's), as SRCommand makes it before the driver's load: what a VDI's load and
    ``cmd`` read, SM's SR lock not yet taken."""
    import lock

    class SrCommand(object):
        pass
    SrCommand.cmd = cmd
    SrCommand.params = dict(params, sr_uuid=sr_uuid, session_ref=session._session)
    sr = cls.__new__(cls)
    sr.uuid = sr_uuid
    sr.session = session
    sr.sr_ref = session.xenapi.SR.get_by_uuid(sr_uuid)
    sr.srcmd = SrCommand()
    sr.cmd = cmd
    sr.o_direct = False
    sr.sm_config = {}
    sr.dconf = {}
    sr.original_srcmd = None
    sr.vdis = {}
    sr.lock = lock.Lock("sr", sr_uuid)
    return sr


def _lvhd_sr_fields(sr):
    """What LVHDSR.load sets that a VDI's load and delete read (the SR attached on its
    master, not in legacy mode)."""
    import journaler
    import lvhdutil
    import lvmcache
    import LVHDSR
    from lvmanager import LVActivator
    sr.vgname = lvhdutil.VG_PREFIX + sr.uuid
    sr.path = os.path.join(lvhdutil.VG_LOCATION, sr.vgname)
    sr.mdpath = os.path.join(sr.path, LVHDSR.LVHDSR.MDVOLUME_NAME)
    sr.lvmCache = lvmcache.LVMCache(sr.vgname)
    sr.lvActivator = LVActivator(sr.uuid, sr.lvmCache)
    sr.journaler = journaler.Journaler(sr.lvmCache)
    sr.legacyMode = False
    sr.isMaster = True
    sr.provision = "thick"
    sr.thinpr = False


def _lvhd_init(cfg):
    """What SM's LVHDSR.create/attach leave in the VG besides the VDIs' LVs: the ``MGT``
    metadata LV (4 MiB), written by SM's own ``LVHDSR.updateSRMetadata`` from the SR's and
    VDIs' XAPI records."""
    import cleanup
    import lvhdutil
    import lvmcache
    import LVHDSR
    vg = lvhdutil.VG_PREFIX + cfg["sr_uuid"]
    cache = lvmcache.LVMCache(vg)
    cache.create(LVHDSR.LVHDSR.MDVOLUME_NAME, 4 * 1024 * 1024)
    cache.activateNoRefcount(LVHDSR.LVHDSR.MDVOLUME_NAME)
    session = cleanup.XAPI.getSession()
    try:
        sr = LVHDSR.LVHDSR.__new__(LVHDSR.LVHDSR)
        sr.uuid = cfg["sr_uuid"]
        sr.session = session
        sr.sr_ref = session.xenapi.SR.get_by_uuid(sr.uuid)
        sr.mdpath = os.path.join(lvhdutil.VG_LOCATION, vg, LVHDSR.LVHDSR.MDVOLUME_NAME)
        sr.updateSRMetadata("thick")
    finally:
        session.xenapi.session.logout()
    return {"mgt": sr.mdpath}


def _lvhd_sr(cfg):
    """SM's LVHDSR object for the SR, with only what its VDI code reads (see _sm_scan)."""
    import LVHDSR
    import lvhdutil
    import lvmcache
    from lvmanager import LVActivator
    sr = LVHDSR.LVHDSR.__new__(LVHDSR.LVHDSR)
    sr.uuid = cfg["sr_uuid"]
    sr.vgname = lvhdutil.VG_PREFIX + sr.uuid
    sr.path = os.path.join(lvhdutil.VG_LOCATION, sr.vgname)
    sr.lvmCache = lvmcache.LVMCache(sr.vgname)
    sr.lvActivator = LVActivator(sr.uuid, sr.lvmCache)
    return sr


def _refcounts(cfg):
    import lvhdutil
    from refcounter import RefCounter
    ns = lvhdutil.NS_PREFIX_LVM + cfg["sr_uuid"]
    d = os.path.join(RefCounter.BASE_DIR, ns)
    names = sorted(n for n in os.listdir(d)) if os.path.isdir(d) else []
    return {n: list(RefCounter.check(n, ns)) for n in names}


def _chain_set_active(cfg, vdi_uuid, active):
    """LVHDVDI._chainSetActive(active, binary=True, persistent=active) for a VHD VDI, with
    SM's own objects (the VDI object itself needs an SRCommand)."""
    import lvhdutil
    import vhdutil
    from refcounter import RefCounter
    sr = _lvhd_sr(cfg)
    ns = lvhdutil.NS_PREFIX_LVM + sr.uuid
    count, bcount = RefCounter.check(vdi_uuid, ns)
    if (active and bcount > 0) or (not active and bcount == 0):
        return                                      # SM: a redundant call
    chain = vhdutil.getParentChain(lvhdutil.LV_PREFIX[vhdutil.VDI_TYPE_VHD] + vdi_uuid,
                                   lvhdutil.extractUuid, sr.vgname)
    for uuid in chain:
        lv_name = lvhdutil.LV_PREFIX[vhdutil.VDI_TYPE_VHD] + uuid
        if active:
            sr.lvActivator.activate(uuid, lv_name, uuid == vdi_uuid, True)
        else:
            sr.lvActivator.add(uuid, lv_name, uuid == vdi_uuid)
    if active:
        sr.lvActivator.persist()
    elif not sr.lvActivator.deactivateAll():
        raise RuntimeError("SM's deactivateAll failed (see SMlog)")


def _fix_refcounts(cfg):
    import lvhdutil
    import lvmcache
    lvhdutil.setInnerNodeRefcounts(lvmcache.LVMCache(lvhdutil.VG_PREFIX + cfg["sr_uuid"]),
                                   cfg["sr_uuid"])


def _classify(cleanup, sr):
    vdis = {}
    for u, v in sr.vdis.items():
        vdis[u] = {"parent": v.parent.uuid if v.parent else None, "hidden": bool(v.hidden),
                   "children": sorted(c.uuid for c in v.children),
                   "scan_error": bool(v.scanError)}
    # the SR's switches as findCoalesceable / findLeafCoalesceable read them
    # (other-config:coalesce=false, leaf-coalesce=false: nothing is picked)
    leaf = []
    if not sr.leafCoalesceForbidden():
        sr.gatherLeafCoalesceable(leaf)
    coalesce_off = sr.xapi.srRecord["other_config"].get(cleanup.VDI.DB_COALESCE) == "false"
    return {"vdis": vdis,
            "coalesceable": [] if coalesce_off else sorted(
                u for u, v in sr.vdis.items() if v.isCoalesceable()),
            "leaf_coalesceable": sorted(v.uuid for v in leaf),
            "garbage": sorted(v.uuid for v in sr.findGarbage())}


def _sm_cbt(cfg):
    """SM's CBT code (VDI.py ``_cbt_snapshot``, ``delete``; FileSR.py ``_create_cbt_log``,
    ``_rename``, ``_delete_cbt_log``; cbtutil.py with the real cbt-util) on a FileVDI made
    without its driver: the SR's path is the log directory, the VDI's virtual size what the
    test says (``VDI.get_virtual_size``), blocktracking on (the log exists). SM's pause of the
    child VDI around a coalesce (blktap2.VDI.tap_pause/tap_unpause: the copies here are open
    in no tapdisk) is recorded, not done."""
    import cbtutil
    import blktap2
    import FileSR
    import VDI
    c = cfg["cbt"]
    cbtutil.CBT_UTIL = c["cbt_util"]
    paused = []
    blktap2.VDI.tap_pause = staticmethod(lambda session, sr, vdi: paused.append(vdi) or True)
    blktap2.VDI.tap_unpause = staticmethod(lambda session, sr, vdi, *a: True)

    class Stub(object):
        pass
    sr = Stub()
    sr.path, sr.uuid = c["dir"], cfg["sr_uuid"]
    sr.srcmd = Stub()
    sr.srcmd.params = {"vdi_ref": "OpaqueRef:stub"}
    session = Stub()
    session.xenapi = Stub()
    session.xenapi.VDI = Stub()
    session.xenapi.VDI.get_virtual_size = lambda ref: str(c["size"])
    v = object.__new__(FileSR.FileVDI)
    v.sr, v.session, v.uuid = sr, session, c["vdi_uuid"]
    if c["op"] == "snapshot":
        v._cbt_snapshot(c["snapshot_uuid"], c["consistent"])
    elif c["op"] == "delete":
        v._get_blocktracking_status = lambda uuid=None: True
        VDI.VDI.delete(v, cfg["sr_uuid"], c["vdi_uuid"])
    elif c["op"] == "clone":
        # XAPI's VM.revert clones the snapshot's VDI (VDI.clone -> SM's clone): SM's own
        # FileVDI.clone / LVHDVDI.clone down to _snapshot, which is recorded with the cbtlog
        # it is given (its CBT step: `if snap_type == SNAPSHOT_DOUBLE and cbtlog:
        # _cbt_snapshot`), the image work not done (the copies are logs only)
        import LVHDSR
        import vhdutil
        cls = LVHDSR.LVHDVDI if c.get("lvhd") else FileSR.FileVDI
        v = object.__new__(cls)
        v.sr, v.session, v.uuid = sr, session, c["vdi_uuid"]
        v.vdi_type = vhdutil.VDI_TYPE_VHD
        v.disable_leaf_on_secondary = lambda vdi_uuid, secondary=None: None
        given = []

        def _snapshot(snap_type, *args):
            # FileVDI._snapshot(snap_type, cbtlog, cbt_consistency);
            # LVHDVDI._snapshot(snapType, cloneOp, cbtlog, cbt_consistency)
            names = (["cloneOp"] if c.get("lvhd") else []) + ["cbtlog", "cbt_consistency"]
            given.append(dict(zip(names, args), snap_type=snap_type))
        v._snapshot = _snapshot
        cls.clone(v, cfg["sr_uuid"], c["vdi_uuid"])
        return {"paused": paused, "snapshot_calls": given}
    else:
        raise SystemExit("unknown CBT op %s" % c["op"])
    return {"paused": paused}


def main(argv):
    cfg = json.loads(argv[1])
    action = argv[2]
    cleanup = _setup(cfg)
    for d in ("ipc", "nonpersistent"):
        os.makedirs(os.path.join(cfg["state"], d), exist_ok=True)
    os.makedirs(cfg["refcount_dir"], exist_ok=True)
    if action == "scan":
        result = _sm_scan(cfg)
    elif action == "vdi-delete":
        result = _vdi_delete(cfg)
    elif action == "lvhd-init":
        result = _lvhd_init(cfg)
    elif action in ("attach", "detach"):
        _chain_set_active(cfg, argv[3], action == "attach")
        result = _refcounts(cfg)
    elif action == "refcounts":
        result = _refcounts(cfg)
    elif action == "fixrefcounts":
        _fix_refcounts(cfg)
        result = _refcounts(cfg)
    elif action == "cbt":
        result = _sm_cbt(cfg)
    elif action == "host-plugin":              # testxen/sm_hosts.py: another host's plugins
        from testxen import sm_hosts
        result = sm_hosts.run_plugin(cfg, argv[3], argv[4], json.loads(argv[5]), argv[6])
    elif action == "sm-snapshot":              # testxen/sm_hosts.py: SM's own vdi_snapshot
        from testxen import sm_hosts
        result = sm_hosts.sm_snapshot(cfg, argv[3], argv[4])
    elif action == "gc-quiet":
        # the GC as the SMGC service runs it after a kick: its quiet period first
        # (_gcLoopPause, GCPAUSE_DEFAULT_SLEEP), which an abort ends
        cleanup._create_init_file(cfg["sr_uuid"])
        try:
            cleanup._gc(None, cfg["sr_uuid"], dryRun=False, immediate=False)
            result = {"aborted": False}
        except cleanup.AbortException:
            cleanup.Util.log("Aborted")
            result = {"aborted": True}
    elif action in ("classify", "gc"):
        if action == "gc":
            cleanup._gc(None, cfg["sr_uuid"], dryRun=False, immediate=True)
        session = cleanup.XAPI.getSession()
        try:
            sr = cleanup.SR.getInstance(cfg["sr_uuid"], session)
            sr.scanLocked()
            result = _classify(cleanup, sr)
            sr.cleanup()
        finally:
            session.xenapi.session.logout()
    else:
        raise SystemExit("unknown action %s" % action)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
