"""The pool's hosts in the XAPI stand-in serving SM's own host plugins: another member
(``Host``) and the stand-in's own host, the master (``master``).

In a pool every host runs its own tapdisks and keeps its own LV activations, SM refcounts
(``/var/run/sm/refcount``) and SM locks (``/var/lock/sm``); the SR master reaches the others
through ``host.call_plugin``: SM's ``tapdisk-pause`` (``drivers/tapdisk-pause``: ``pause``,
``unpause``, ``refresh`` of the tapdisk serving a VDI there, under that host's VDI lock) and
``on-slave`` (``drivers/on_slave.py``: ``multi``, LV activation, refresh, deactivation and
refcount cleanup there). ``Host`` adds such a host (``host`` and ``host_metrics`` records, a
PBD of the SR plugged on it, its own state directory) and serves those two plugins for it
with SM's own code, each call in its own Python process as xapi runs a plugin (the SM
process of testxen/sm.py, with this host's uuid, lock and refcount directories and log).
``master`` serves them the same way for the stand-in's own host, with SM's directories and
log there (the ones SM's GC and livesnap use in the test): SM's leaf-coalesce of a VDI
attached on the master pauses its tapdisk through this plugin process, as on a host (python
start-up and SM's imports included in each call, as xapi's fork and exec of the plugin).
Each call's start and end are kept (``Host.plugin_calls``).

What cannot be a second host here: this is one machine (one kernel, one ``/dev``), so the
host's LV views are the test bed's (testxen/lvm.py: loop devices, no device-mapper), and its
tapdisks are this machine's real tapdisks. So:

* ``on-slave``: SM's ``multi`` runs unchanged (its ``LVMCache``, ``RefCounter`` in this
  host's directory, ``Lock.cleanup``); its LVM commands go to the LVM stand-in, where
  this host's activation changes leave the machine's devices (the master's) alone
  (``TESTXEN_LVM_OTHER_HOST``: the commands run, their effect on this host's views is not
  modelled), and
  ``lvutil._lvmBugCleanup`` (which removes a ``/dev/mapper`` node it takes for a leftover) is
  not run: the node is the master's too here; the dm table its refresh logs is the LV's
  linear map onto its loop device (testxen/dmsetup-table). What the calls did to a real slave's dm tables
  (stale sizes and names until refreshed) is not modelled: the tests check that the calls a
  real slave needs are made, with what arguments, in what order against the pause.
* ``tapdisk-pause``: the plugin's ``Tapdisk`` class runs (its VDI lock, failfast,
  ``_pathRefresh``, ``activate_parents`` through SM's LVMCache and this host's refcounts, the
  CBT question, ``blktap2.Tapdisk`` and ``TapCtl`` for pause and unpause with the real
  tap-ctl). What a host's blktap kernel bookkeeping gives it is given here: the VDI's tap
  device ``/dev/sm/backend/<sr>/<vdi>`` is a file under this host's state directory naming
  the image path (``plug``), its major/minor are those of the tapdisk serving that path
  (``tap-ctl list``); ``TapCtl.pause`` is nudged (testxen.blktap.pause: tapdisk may leave a
  finished pause unanswered); SM's ``VDI.from_uuid`` (which needs xapi's SM records) is an
  object answering the CBT questions as SM's VDI does (the log ``<vdi>.cbtlog`` exists in
  the SR: an LV of the VG, a file of a file SR).

``sm_snapshot`` runs SM's own LVHD ``vdi_snapshot`` on the master (the SM process of
testxen/sm.py, action ``sm-snapshot``): the control for livesnap's create of a VDI attached
on another host (``util.gen_uuid`` is Python's: SM runs ``uuidgen``, not installed here).
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAJOR = 254          # the major number the host's "tapdev" devices have here


class Host(object):
    """A pool host of the stand-in ``xapi`` serving SM's tapdisk-pause and on-slave through
    ``sm`` (testxen.sm.Sm): a new member ``name`` with the SR ``sr`` plugged (its own state,
    lock and refcount directories and log under ``sm.state``), or, with ``ref``, a host the
    stand-in already has (``master``: the stand-in's own host, sharing SM's directories and
    log there, as SM's code and its plugins share them on one host)."""

    def __init__(self, xapi, sm, sr, name="host2", ref=None, state=None, lock_dir=None,
                 refcount_dir=None, log_path=None):
        self.xapi, self.sm, self.sr = xapi, sm, sr
        if ref is None:
            self.metrics = xapi._add("host_metrics", {"live": True})
            ref = xapi._add("host", {"name_label": name, "hostname": name, "enabled": True,
                                     "metrics": self.metrics, "PBDs": [],
                                     "resident_VMs": []})
            pbd = xapi._add("PBD", {"SR": sr, "host": ref, "currently_attached": True,
                                    "device_config": {}})
            xapi.record("host", ref)["PBDs"].append(pbd)
            xapi.record("SR", sr).setdefault("PBDs", []).append(pbd)
            xapi.record("SR", sr)["shared"] = True            # plugged on two hosts: shared
        self.ref = ref
        self.state = state or os.path.join(sm.state, "host-" + name)
        self.lock_dir = lock_dir or os.path.join(self.state, "lock")
        self.refcount_dir = refcount_dir or os.path.join(self.state, "refcount")
        self.log_path = log_path or os.path.join(self.state, "SMlog")
        self.backend = os.path.join(self.state, "dev-sm", "backend")
        os.makedirs(self.backend, exist_ok=True)
        # (plugin, fn, start, end in time.monotonic_ns, start in time.time: SMlog's clock)
        self.plugin_calls = []
        for plugin in ("tapdisk-pause", "on-slave"):
            xapi.host_plugins[(self.ref, plugin)] = self._serve(plugin)

    @property
    def uuid(self):
        return self.xapi.record("host", self.ref)["uuid"]

    def config(self):
        return {"host_uuid": self.uuid, "state": self.state, "lock_dir": self.lock_dir,
                "refcount_dir": self.refcount_dir, "log": self.log_path,
                "backend": self.backend, "lvm_master": None,
                "other_host": self.ref != self.xapi.host}

    def _serve(self, plugin):
        def serve(session, fn, args):
            # the SR the call names (SM passes sr_uuid to both plugins' calls), else ours
            sr = self.sr
            for ref, rec in self.xapi.objects["SR"].items():
                if rec["uuid"] == args.get("sr_uuid"):
                    sr = ref
            t0, w0 = time.monotonic_ns(), time.time()
            try:
                return self.sm.run("host-plugin", sr, plugin, fn, json.dumps(args), session,
                                   extra=self.config())
            finally:
                self.plugin_calls.append((plugin, fn, t0, time.monotonic_ns(), w0))
        return serve

    def plug(self, vdi_ref, path):
        """What SM's attach of the VDI leaves here for blktap and xapi, given: its tap device
        (naming ``path``, which this machine's tapdisk serves) and ``sm_config``
        ``host_<ref>`` = RW. No refcount (a file SR's attach keeps none; see ``attach``)."""
        rec = self.xapi.record("VDI", vdi_ref)
        sr_uuid = self.xapi.record("SR", rec["SR"])["uuid"]
        d = os.path.join(self.backend, sr_uuid)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, rec["uuid"]), "w") as f:
            f.write(path)
        rec["sm_config"]["host_" + self.ref] = "RW"

    def unplug(self, vdi_ref):
        rec = self.xapi.record("VDI", vdi_ref)
        rec["sm_config"].pop("host_" + self.ref, None)
        sr_uuid = self.xapi.record("SR", rec["SR"])["uuid"]
        try:
            os.unlink(os.path.join(self.backend, sr_uuid, rec["uuid"]))
        except FileNotFoundError:
            pass

    def attach(self, vdi_ref, path):
        """An LVHD VDI attached here as SM's attach leaves it for this test bed: ``plug``,
        and SM's refcounts and activation of its chain in this host's namespace
        (``Sm.attach`` with this host's directories). Returns the refcounts."""
        self.plug(vdi_ref, path)
        sr = self.xapi.record("VDI", vdi_ref)["SR"]
        return self.sm.run("attach", sr, self.xapi.record("VDI", vdi_ref)["uuid"],
                           extra=self.config())

    def detach(self, vdi_ref):
        sr = self.xapi.record("VDI", vdi_ref)["SR"]
        self.unplug(vdi_ref)
        return self.sm.run("detach", sr, self.xapi.record("VDI", vdi_ref)["uuid"],
                           extra=self.config())

    def refcounts(self, sr=None):
        """This host's SM refcounts of the SR ({uuid: [count, binary]})."""
        return self.sm.run("refcounts", sr or self.sr, extra=self.config())

    def log(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""


def master(xapi, sm, sr=None):
    """The stand-in's own host (the pool master) serving SM's own plugins as ``Host`` serves
    another member's: SM's directories (``sm.lock_dir``: livesnap's SM lock directory in the
    tests, ``sm.refcount_dir``: livesnap's refcounts where set) and SM's log are this host's,
    as on a host. VDIs attached here are given their tap device with ``plug``/``attach``."""
    return Host(xapi, sm, sr, ref=xapi.host, state=sm.state,
                lock_dir=sm.lock_dir, refcount_dir=sm.refcount_dir, log_path=sm.log_path)


def plugin_calls(xapi, since=0):
    """[(host ref, plugin, fn, args)] of the ``host.call_plugin`` calls the stand-in served
    from ``xapi.calls[since:]``."""
    return [tuple(a[:4]) for m, a in xapi.calls[since:] if m == "host.call_plugin"]


# -- in the SM process (python -m testxen.sm CONFIG host-plugin PLUGIN FN ARGS SESSION) --------

def run_plugin(cfg, plugin, fn, args, session_ref):
    """SM's own plugin function ``fn`` of ``plugin`` with ``args``, as XenAPIPlugin.dispatch
    calls it (a session to the stand-in holding the caller's session ref)."""
    import XenAPI
    session = XenAPI.xapi_local()
    session._session = session_ref
    drivers = os.path.join(cfg["tree"], "drivers")
    if plugin == "on-slave":
        import lvutil
        lvutil._lvmBugCleanup = lambda path: None        # see the module's docstring
        lvutil.CMD_DMSETUP = os.path.join(ROOT, "testxen", "dmsetup-table")
        # a host's two LVM configurations (dom0's read-only one, the master's /etc/lvm/master
        # that on-slave's refresh switches to): the test's pair (testxen.lvm.dom0_conf)
        lvutil.DEF_LVM_CONF = os.environ.get("LVM_SYSTEM_DIR", lvutil.DEF_LVM_CONF)
        lvutil.MASTER_LVM_CONF = os.environ.get("LIVESNAP_LVM_MASTER_DIR",
                                                lvutil.MASTER_LVM_CONF)
        import on_slave
        fns = {"multi": on_slave.multi}
    elif plugin == "tapdisk-pause":
        tp = _load(os.path.join(drivers, "tapdisk-pause"), "tapdisk_pause")
        _bookkeeping(cfg, tp)
        fns = {"pause": tp.tapPause, "unpause": tp.tapUnpause, "refresh": tp.tapRefresh}
    else:
        raise SystemExit("no plugin %s" % plugin)
    if fn not in fns:
        raise SystemExit("plugin %s has no %s" % (plugin, fn))
    return fns[fn](session, args)


def _load(path, name):
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_loader(name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


def _bookkeeping(cfg, tp):
    """What blktap's kernel side gives the plugin on a host, given here (module docstring)."""
    import blktap2
    import VDI
    from testxen import blktap as tb
    tp.TAPDEV_BACKPATH_PFX = cfg["backend"]
    tp.TAPDEV_PHYPATH_PFX = os.path.join(os.path.dirname(cfg["backend"]), "phy")
    blktap2.TapCtl.PATH = os.environ.get("TAP_CTL") or tb.tap_ctl_bin()
    blktap2.Tapdisk.major = classmethod(lambda cls: MAJOR)

    def major_minor(dev):
        with open(dev) as f:
            path = f.read().strip()
        for t in blktap2.Tapdisk.list():
            if t.path == path:
                return [MAJOR, t.minor]
        return [0, 0]                      # no tapdisk: "Non-tap major number"
    tp._getDevMajor_minor = major_minor

    def pause(cls, pid, minor):
        rc, out, err = tb.pause(pid, minor)
        if rc != 0:
            raise blktap2.TapCtl.CommandFailure(["pause", "-p", pid, "-m", minor], status=rc)
    blktap2.TapCtl.pause = classmethod(pause)
    VDI.VDI.from_uuid = staticmethod(lambda session, vdi_uuid: _CbtVdi(session, vdi_uuid, cfg))


class _CbtVdi(object):
    """The CBT answers of SM's VDI object (VDI._get_blocktracking_status: the log exists;
    _get_cbt_logpath: ``<sr path>/<uuid>.cbtlog``)."""

    def __init__(self, session, vdi_uuid, cfg):
        ref = session.xenapi.VDI.get_by_uuid(vdi_uuid)
        sr = session.xenapi.SR.get_record(session.xenapi.VDI.get_SR(ref))
        self.lvhd = sr["type"] in ("lvm", "lvmoiscsi", "lvmohba")
        self.sr_uuid = sr["uuid"]
        self.uuid = vdi_uuid
        # a file SR's directory: the stand-in's (/var/run/sr-mount/<sr> on a host)
        self.sr_path = cfg["sr_path"] if cfg.get("sr_uuid") == self.sr_uuid else \
            os.path.join("/var/run/sr-mount", self.sr_uuid)

    def _get_cbt_logname(self, uuid):
        return "%s.cbtlog" % uuid

    def _get_cbt_logpath(self, uuid):
        if self.lvhd:
            return "/dev/VG_XenStorage-%s/%s" % (self.sr_uuid, self._get_cbt_logname(uuid))
        return os.path.join(self.sr_path, self._get_cbt_logname(uuid))

    def _get_blocktracking_status(self, uuid=None):
        if self.lvhd:
            import lvutil
            return lvutil._checkLV(self._get_cbt_logpath(uuid or self.uuid))
        return os.path.exists(self._get_cbt_logpath(uuid or self.uuid))

    def _activate_cbt_log(self, logname):
        return False


def sm_snapshot(cfg, vdi_ref, vdi_uuid):
    """SM's own ``vdi_snapshot`` of an LVHD VDI on the master (``LVHDVDI.snapshot``: its
    ``tap_pause`` on the hosts the VDI is attached on, ``_snapshot`` with its
    ``_updateSlaves*`` calls, the records it introduces), on SR and VDI objects made as
    SRCommand makes them (as testxen.sm's ``vdi-delete``), under SM's SR lock. Returns the
    new snapshot VDI's uuid."""
    import cleanup
    import util
    import LVHDSR as driver
    from testxen import sm as smmod
    session = cleanup.XAPI.getSession()
    try:
        util.sr_get_capability = lambda sr_uuid, session=None: list(driver.CAPABILITIES)
        import uuid
        util.gen_uuid = lambda: str(uuid.uuid4())      # SM runs uuidgen, not installed here

        sr = smmod.sr_object(driver.LVHDSR, session, cfg["sr_uuid"], "vdi_snapshot",
                             {"vdi_ref": vdi_ref, "vdi_uuid": vdi_uuid,
                              "driver_params": {}, "args": []})
        smmod._lvhd_sr_fields(sr)
        sr.lock.acquire()
        try:
            vdi = sr.vdi(vdi_uuid)
            vdi.session = session
            info = vdi.snapshot(sr.uuid, vdi_uuid)
        finally:
            sr.lock.release()
    finally:
        session.xenapi.session.logout()
    return str(info)
