"""A running VM on a pool member that is not the SR master, its disks on a shared LVHD SR
(issue 13): livesnap runs on the master, which alone writes the VG's LVM metadata, and
reaches the VM's host as SM itself does for the same case, through SM's own host plugins
called with XAPI's ``host.call_plugin`` (nothing of SM is copied here):

* **pause** (``blktap2.py`` ``VDI.tap_pause``/``tap_unpause``/``call_pluginhandler``):
  ``sm_config`` ``paused=true`` (with livesnap's mark beside it, as ``XapiDomain.pause_guard``
  sets it locally), then ``tapdisk-pause`` ``pause`` {sr_uuid, vdi_uuid, failfast} on every
  host the VDI's ``sm_config`` names as ``host_<ref>`` (this one too, if it is one);
  afterwards ``unpause`` there and the keys removed. The plugin holds SM's VDI lock on that host around each call;
  its unpause reopens the tapdisk on its own path and passes ``-c`` with the VDI's CBT log
  when the log exists (``_get_blocktracking_status``), as livesnap's local unpause does;
  a mirror (``-2``) is not passed by the plugin either (SM passes it as ``secondary``; a
  mirrored VDI is refused before anything changes, ``refuse_busy``).
* **the other hosts' LV views** (LVHDSR.py ``_updateSlavesPreClone``/``_updateSlavesOnClone``,
  cleanup.py ``_updateSlavesOnRename``/``_updateSlavesOnResize``/``_checkSlaves``, lvhdutil
  ``lvRefreshOnSlaves``): inside each pause, SM's ``on-slave`` plugin ``multi`` on the same
  hosts but the master: before livesnap changes the chain, the leaf's LV deactivated there
  (``deactivateNoRefcount``, as SM before its clone and its leaf-coalesce rename); before the
  unpause, the leaf's LV refreshed (``refresh``: whatever LV now has its name), each LV new
  in the chain activated with that host's refcount (``activate``, SM's namespace
  ``lvm-<sr>``), each LV that left it deactivated with its count taken back (``deactivate``)
  or, gone from the VG, its device, lock and counts dropped there (``deactivateNoRefcount``,
  ``cleanupLockAndRefcount``), and each LV of the chain whose size changed since the command
  began (an inflate or deflate on the master) refreshed. One ``multi`` per host and VG
  before, one after.

Every call is a XAPI round trip inside the guest's pause (SM's own cost model for a VM on
another host); the result's pause times include them. This module holds the protocol (which
hosts, which keys, which plugin calls); what the LV actions are follows from the chains and
is the datapath's (livesnap/datapaths/vhd_remote.py).
"""
import contextlib
import logging

from livesnap.errors import DatapathError, Error, StorageBusy, WrongHost

log = logging.getLogger(__name__)

PLUGIN_PAUSE = "tapdisk-pause"
PLUGIN_ON_SLAVE = "on-slave"
LVHD_SR_TYPES = ("lvm", "lvmoiscsi", "lvmohba")
FILE_SR_TYPES = ("ext", "nfs", "smb", "file")
NULL_REF = "OpaqueRef:NULL"
# sm_config key beside livesnap's paused mark once every host has paused the tapdisk
PAUSED_ON = "livesnap-paused-on"
# on-slave actions that name a refcounted object (ns, uuid) and those that name an LV
_COUNTED = ("activate", "deactivate", "cleanupLockAndRefcount")


def elsewhere(domain):
    """The ref of the host a running VM is resident on when that is not this host, else
    None (halted, here, or a session that cannot say which host it is)."""
    here = domain.platform.this_host()
    resident = domain.record.get("resident_on") or NULL_REF
    if here is None or resident in (NULL_REF, here):
        return None
    if domain.power_state() not in ("Running", "Paused"):
        return None
    return resident


def reachable(domain, disks, files=False):
    """Every disk in ``disks`` is on a shared LVHD SR (``files``: or a shared file SR): this
    host reaches its tapdisk (and LV views) on the VM's host through SM's plugins."""
    for t in disks:
        ref = domain._vdis.get(t)
        if ref is None:
            continue
        if domain._sr_types.get(t) not in LVHD_SR_TYPES + (FILE_SR_TYPES if files else ()):
            return False
        sr = domain.platform.call("VDI.get_SR", ref)
        if not domain.platform.call("SR.get_shared", sr):
            return False
    return True


def refuse_wrong_host(domain, disks, catalog_here=True):
    """Before an operation changes anything (``XapiDomain.refuse_wrong_host``): which host
    acts on a VM.

    * LVHD: the pool master, which alone writes the VG's LVM metadata as SM does
      (``isMaster``, ``/etc/lvm/master``); a VM running on another host is worked on from
      the master through SM's tapdisk-pause and on-slave plugins when all its disks are on
      shared SRs. Its catalog must then be on the master too (livesnap/platforms/
      xapi_catalog.py refuses every other host before this): a catalog left on a host that is
      no longer the master (``xe pool-designate-new-master``, HA) is refused here naming the
      master, since only the master may change the chain and only the catalog's host knows
      it: the catalog is handed to the master first (the plugin's ``catalog_move``,
      platforms/xapi_move.py).
    * file SRs: the host holding the VM's catalog (``catalog_here``), wherever the VM runs: a
      VM running on another host, its disks on shared SRs, is worked on with remote pauses
      (SM's tapdisk-pause there; a file has no LV views). With no catalog here (none made
      yet, no key in XAPI), the host it runs on (its tapdisks are there) makes it, as
      before."""
    here = domain.platform.this_host()
    if here is None:
        return
    resident = domain.record.get("resident_on") or NULL_REF
    running = domain.power_state() in ("Running", "Paused")
    lvhd = [t for t in sorted(disks) if domain._sr_types.get(t) in LVHD_SR_TYPES]
    if lvhd:
        pools = domain.platform.call("pool.get_all")
        master = domain.platform.call("pool.get_master", pools[0]) if pools else here
        if master != here:
            why = ("disks %s are on an LVHD SR, whose LVM metadata only the pool master writes "
                   "(livesnap there pauses the VM's tapdisks on the host it runs on through "
                   "SM's tapdisk-pause plugin)" % ", ".join(lvhd))
            if catalog_here:
                why += ("; the VM's livesnap catalog is on this host: hand it to the master "
                        "first (the livesnap plugin's catalog_move)")
            raise WrongHost(domain.name, domain._host_uuid(master), why)
    if running and resident not in (NULL_REF, here) and \
            not ((lvhd or catalog_here) and reachable(domain, disks, files=catalog_here)):
        raise WrongHost(domain.name, domain._host_uuid(resident),
                        "it runs on host %s, and its tapdisks are there"
                        % domain._host_uuid(resident))


class PoolPause(object):
    """SM's pause of a domain's VDIs attached on other hosts, through XAPI."""

    def __init__(self, domain):
        self.domain = domain
        self.platform = domain.platform
        self.here = domain.platform.this_host()

    def _call(self, host, plugin, fn, args):
        out = self.platform.call("host.call_plugin", host, plugin, fn, args)
        if out != "True":
            raise DatapathError(reason="%s %s of VDI %s on host %s answered %r"
                                % (plugin, fn, args.get("vdi_uuid", ""), host, out))
        return out

    def _disk(self, disk):
        """(VDI ref, VDI uuid, SR uuid, the hosts it is attached on, sm_config). Its
        tapdisks are paused on all of them, this one too if it is one (``tap_pause``); the
        LV views updated on all but this one, the master (``_updateSlaves*``)."""
        ref = self.domain._vdis[disk]
        sm_config = self.platform.call("VDI.get_sm_config", ref)
        hosts = sorted(k[len("host_"):] for k in sm_config if k.startswith("host_"))
        return (ref, self.platform.call("VDI.get_uuid", ref), self.domain._srs[disk], hosts,
                sm_config)

    @contextlib.contextmanager
    def paused(self, disks, views, started):
        """``disks`` paused on their hosts as SM's ``tap_pause`` pauses them. ``views(when,
        disk, recorded=None)`` is the datapath's: "chain" gives the text kept in livesnap's
        mark (the chain as the pause began), "before" (right after the pause) and "after"
        (right before the unpause, whatever the body did) give [(action, vg, lv)] sent to
        those hosts with on-slave ``multi``, "resume" hands back the kept text. The keys go
        after the unpause. ``started(stack)`` is called right before the first pause (its
        callbacks on ``stack`` run after the last unpause).

        A livesnap killed inside a pause left its mark: with ``PAUSED_ON`` (every pause
        done) the tapdisk is still paused and the chain maybe half changed, so the pause is
        taken over as it is (recover re-runs the step); without it, the tapdisk may or may
        not have been paused, the chain untouched: an unpause is tried on each host (one of
        a running tapdisk fails, harmlessly) and the pause starts afresh."""
        dom = self.domain
        with contextlib.ExitStack() as stack:
            infos, resumed = [], set()
            for disk in sorted(set(disks)):
                ref, vdi_uuid, sr_uuid, hosts, sm_config = self._disk(disk)
                if "paused" in sm_config and dom.PAUSED_BY not in sm_config:
                    raise StorageBusy(dom.name, disk, vdi_uuid, dom.SM_BUSY[0][1])
                if not hosts:
                    raise DatapathError(reason="VDI %s of %s is attached on no host (its "
                                        "sm_config has no host_ key): nothing to pause"
                                        % (vdi_uuid, dom.name))
                info = (disk, vdi_uuid, sr_uuid, hosts, ref)
                if dom.PAUSED_BY in sm_config and PAUSED_ON in sm_config:
                    resumed.add(disk)
                    views("resume", disk, sm_config[dom.PAUSED_BY])
                elif dom.PAUSED_BY in sm_config:
                    self._try_unpause(info)
                    self.platform.call("VDI.remove_from_sm_config", ref, dom.PAUSED_BY)
                    del sm_config[dom.PAUSED_BY]
                if dom.PAUSED_BY not in sm_config:
                    self.platform.call("VDI.add_to_sm_config", ref, dom.PAUSED_BY,
                                       views("chain", disk) or "true")
                stack.callback(self._unmark, ref)
                if "paused" not in sm_config:
                    self.platform.call("VDI.add_to_sm_config", ref, "paused", "true")
                infos.append(info)
            started(stack)
            for disk, vdi_uuid, sr_uuid, hosts, ref in infos:
                for host in hosts:
                    args = {"sr_uuid": sr_uuid, "vdi_uuid": vdi_uuid, "failfast": "False"}
                    if disk not in resumed:
                        self._call(host, PLUGIN_PAUSE, "pause", args)
                    stack.callback(self._call, host, PLUGIN_PAUSE, "unpause", dict(args))
                if disk not in resumed:
                    self.platform.call("VDI.add_to_sm_config", ref, PAUSED_ON, "true")
            stack.callback(self._multi, infos, views, "after")      # before the unpauses
            self._multi([i for i in infos if i[0] not in resumed], views, "before")
            yield

    def _try_unpause(self, info):
        disk, vdi_uuid, sr_uuid, hosts, ref = info
        for host in hosts:
            try:
                self._call(host, PLUGIN_PAUSE, "unpause",
                           {"sr_uuid": sr_uuid, "vdi_uuid": vdi_uuid, "failfast": "False"})
            except Error as e:
                log.info("VDI %s on host %s: unpause refused (%s): not paused", vdi_uuid,
                         host, e)

    def _unmark(self, ref):
        try:
            self.platform.call("VDI.remove_from_sm_config", ref, PAUSED_ON)
        except Error as e:
            log.warning("sm_config %s of VDI %s not removed: %s", PAUSED_ON, ref, e)
        self.domain._unmark_paused(ref)

    def _multi(self, infos, views, when):
        """One ``on-slave`` ``multi`` per host and VG with what ``views`` asks."""
        per = {}
        for disk, vdi_uuid, sr_uuid, hosts, ref in infos:
            for action, vg, lv in views(when, disk):
                for host in [h for h in hosts if h != self.here]:
                    per.setdefault((host, vg, sr_uuid), []).append((action, lv))
        for (host, vg, sr_uuid), acts in sorted(per.items()):
            args = {"vgName": vg}
            for i, (action, lv) in enumerate(acts, 1):
                args["action%d" % i] = action
                if action in _COUNTED:
                    args["ns%d" % i] = "lvm-" + sr_uuid
                    args["uuid%d" % i] = lv[len("VHD-"):] if lv.startswith("VHD-") else lv
                if action != "cleanupLockAndRefcount":
                    args["lvName%d" % i] = lv
            self._call(host, PLUGIN_ON_SLAVE, "multi", args)

    def heal(self, disks, views):
        """After a crash inside a pause, for each of ``disks`` whose VDI carries livesnap's
        mark: paused everywhere (``PAUSED_ON``): the other hosts' views brought from the
        kept chain to the chain now ("after"), then unpaused there; else an unpause tried.
        The keys removed. Returns those disks."""
        healed = []
        for disk in sorted(disks):
            if disk not in self.domain._vdis:
                continue
            ref, vdi_uuid, sr_uuid, hosts, sm_config = self._disk(disk)
            if self.domain.PAUSED_BY not in sm_config:
                continue
            info = (disk, vdi_uuid, sr_uuid, hosts, ref)
            if PAUSED_ON in sm_config:
                views("resume", disk, sm_config[self.domain.PAUSED_BY])
                self._multi([info], views, "after")
                for host in hosts:
                    self._call(host, PLUGIN_PAUSE, "unpause",
                               {"sr_uuid": sr_uuid, "vdi_uuid": vdi_uuid, "failfast": "False"})
            else:
                self._try_unpause(info)
            self._unmark(ref)
            healed.append(disk)
        return healed
