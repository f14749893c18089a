"""``livesnap xapi-follow``: a service on a XAPI host that gives a snapshot deleted outside
livesnap (``xe snapshot-uninstall``, ``xe vm-uninstall``, ``xe vdi-destroy``, XenCenter)
the merge livesnap's own delete makes: at once, online, child-aware, with
livesnap's bounded pauses, instead of SM's garbage collector's later leaf-coalesce (which
pauses the VM up to 10 s).

Such a delete reaches SM directly: xapi's ``VDI.destroy`` runs the SR driver's ``vdi_delete``
(``FileVDI.delete`` unlinks the snapshot VDI's image, ``LVHDVDI.delete`` hides it, forgets
its record and removes its LV), which kicks SM's GC (``_kickGC``). The GC would find the base
copy hidden with one child and leaf-coalesce it into the VM's leaf.

The follower watches XAPI's events (``event.from`` on ``vdi`` and ``vm``, with xapi's token;
``del`` events carry no snapshot of the deleted record, and an object made and deleted
between two calls yields none: events only wake the follower up, and it then compares every
livesnap catalog of the state directory with XAPI). A VM whose catalog names a snapshot face
(a snapshot's VDI) that XAPI no longer knows is then, with SM's GC held off the SRs of those
faces (``sm_gc.held_off``: SM's ``gc_active`` lock and abort flag), run through the engine's
``reclaim``: the catalog follows what SM did, re-reading the images under SM's SR lock
(engine/sm_follow.py: the face deleted; the base copy already leaf-coalesced by SM's GC if it
won the race), and what is left to merge is merged. On start the same comparison runs once
(faces deleted while the follower was not running). A VM another livesnap command holds is
tried again shortly after; one with an operation a killed livesnap command left open is
recovered first. ``xe snapshot-destroy`` (``VM.destroy`` of the record, the VDIs kept)
deletes nothing: its ``del`` event finds no face gone. A VM XAPI no longer has (``xe
vm-uninstall`` of the VM) is not merged: its images are SM's GC's garbage (``vm_gone``).

How it runs as a host service (a systemd unit, ``--install-unit``):

* **xapi restarts** (``xe-toolstack-restart``): a call that loses the link to xapi
  (platforms/xapi_link.py ``is_lost``) is logged once; the follower logs in again with a
  bounded backoff (0.5 s doubling to 30 s), takes a new ``event.from`` token and compares
  again, since the outage's events are lost. SIGTERM/SIGINT end it cleanly at any wait.
* **pools: who acts**: the host XAPI records as holding the VM's catalog
  (platforms/xapi_catalog.py: a catalog elsewhere is stale), wherever the VM runs (remote
  pauses through SM's tapdisk-pause when it runs elsewhere; LVHD needs that host to be the
  master, else ``WRONG_HOST``). With no key (an older livesnap's catalog), ``owner``: a
  running VM is the business of the follower of the host
  it runs on (its tapdisks are there), a halted one the pool master's, and one with a disk
  on an LVHD SR always the master's (SM writes LVM metadata only there). Any other follower
  skips the VM quietly (a debug line).
* **refused, tried again**: a VM another livesnap command holds is tried again after 2 s;
  one whose VDI SM is busy with (``sm_config`` ``paused`` by SM, ``relinking``, ``mirror``)
  or that this host cannot act on yet (``WRONG_HOST``), both checked before SM's GC is held
  off, after 2 s, 4 s ... up to 60 s; a merge that failed the same up to 10 min. The full
  comparison runs at least every 60 s (``--reconcile-interval``), a VM waiting for its
  retry excepted. The same refusal is logged and reported once.
* **VMs gone** (``xe vm-uninstall``): reported once with the images left; the catalog, its
  journal and lock are removed once XAPI has no VM and none of the catalog's images are
  left, i.e. nothing is left that ``recover`` could need (engine/gone.py, handed in by the
  front end as ``forget_if_done``).

Python 3.6, stdlib only; the XenAPI session is the caller's (``xapi.connect_local`` on a
host), or made by the follower with ``connect``.
"""
import glob
import json
import logging
import os
import time

from livesnap.errors import (Busy, DomainNotFound, Error, Interrupted, InterruptedOperation,
                             SmGcBusy, StorageBusy, WrongHost)
from livesnap.platforms import sm_gc, xapi_catalog, xapi_link
from livesnap.platforms.xapi import NULL_REF, XapiError, image_uuid, is_uuid

log = logging.getLogger(__name__)

CLASSES = ["vdi", "vm"]
RETRY_S = 2.0               # a VM busy with another livesnap command: tried again after this
BUSY_CAP_S = 60.0           # a VDI SM works on, WRONG_HOST: tried again after 2 s, 4 s ... up
FAILED_CAP_S = 600.0        # a merge that failed: the same, up to this
RECONCILE_S = 60.0          # the full comparison with XAPI, at least this often
WAIT_S = 30.0               # the longest single event.from wait
_UNKNOWN = object()


def sr_of(path):
    """The SR uuid an image path lies in (``<mount>/<sr>/<uuid>.vhd``,
    ``/dev/VG_XenStorage-<sr>/VHD-<uuid>``), or None."""
    d = os.path.basename(os.path.dirname(path))
    if d.startswith("VG_XenStorage-"):
        d = d[len("VG_XenStorage-"):]
    return d.lower() if is_uuid(d) else None


def read_catalogs(state_dir):
    """{vm uuid: (faces, open_srs)} of the state directory's catalogs, each read once:
    ``faces`` [(snapshot, disk, image path, vdi uuid)] of every snapshot face (a snapshot's
    leaf image named by a VDI uuid: SM's layout); ``open_srs`` the SR uuids of its images
    when an operation a killed livesnap command left is open (its journal not finished:
    ``recover`` continues it; until then SM's GC stays held off those SRs,
    platforms/sm_gc_hold.py), else None."""
    from livesnap.catalog import Catalog
    from livesnap.model.tree import SNAPSHOT
    out = {}
    for vm in catalog_vms(state_dir):
        path = os.path.join(state_dir, vm + ".db")
        try:
            cat = Catalog(path)
        except Error as e:
            log.warning("catalog %s not read: %s", path, e)
            continue
        try:
            tree = cat.load_tree()
            open_op = cat.unfinished() is not None
        finally:
            cat.close()
        faces = []
        for n in sorted(tree.nodes.values(), key=lambda n: n.path):
            u = image_uuid(n.path)
            if n.state == SNAPSHOT and n.snapshot and u and not tree.children(n.id):
                faces.append((n.snapshot, n.disk, n.path, u))
        open_srs = sorted({s for s in (sr_of(n.path) for n in tree.nodes.values()) if s}) \
            if open_op else None
        out[vm] = (faces, open_srs)
    return out


def catalog_vms(state_dir):
    """The VM uuids of the state directory's catalogs, sorted."""
    vms = (os.path.basename(p)[:-len(".db")]
           for p in glob.glob(os.path.join(state_dir, "*.db")))
    return sorted(vm for vm in vms if is_uuid(vm))


def on_lvhd(path):
    """An image path on an LVHD SR (``/dev/VG_XenStorage-<sr>/...``)."""
    return bool(path) and os.path.basename(os.path.dirname(path)).startswith("VG_XenStorage-")


def owner(record, lvhd, master):
    """The host (ref) whose follower acts on a VM (its XAPI ``record``): the pool ``master``
    when it has a disk on an LVHD SR (``lvhd``: SM writes LVM metadata only there), else the
    host it runs on (``resident_on``: its tapdisks are there), else (halted, suspended) the
    master."""
    resident = record.get("resident_on") or NULL_REF
    if not lvhd and record.get("power_state") in ("Running", "Paused") and resident != NULL_REF:
        return resident
    return master


class Follower(object):
    """Follows XAPI for the catalogs in ``state_dir``: ``platform`` an ``XapiPlatform``,
    ``engine`` an ``Engine`` on it (made by the front end: platforms do not drive the
    engine); ``connect()`` a new logged-in XenAPI session, to log in again after xapi went
    away (without it ``run`` ends with the lost call's error); ``forget_if_done(vm)`` the
    catalog of a VM XAPI no longer has removed if nothing of it is left, else [images left]
    (engine/gone.py; without it the catalog stays)."""

    def __init__(self, platform, engine, state_dir, gc_timeout=60.0, report=None,
                 connect=None, reconcile_interval=RECONCILE_S, forget_if_done=None):
        self.platform = platform
        self.engine = engine
        self.state_dir = state_dir
        self.sm_lock_dir = platform.sm_lock_dir
        self.sm_ipc_dir = platform.sm_ipc_dir
        self.gc_timeout = gc_timeout
        self.report = report            # f(dict) for each VM acted on, e.g. a JSON line
        self.connect = connect
        self.reconcile_interval = reconcile_interval
        self.forget_if_done = forget_if_done
        self.retry = {}                 # vm -> (when, delay): tried again then
        self.told = {}                  # vm -> the refusal or failure last logged and reported
        self.gone = set()               # VMs XAPI no longer has, reported
        self.here = _UNKNOWN            # this host's ref (per session), None: cannot say
        self.stopper = None

    def _report(self, out):
        if self.report is not None:
            self.report(out)
        return out

    # -- who acts ----------------------------------------------------------------------------

    def this_host(self):
        if self.here is _UNKNOWN:
            self.here = self.platform.this_host()
        return self.here

    def master(self):
        pools = self.platform.call("pool.get_all")
        return self.platform.call("pool.get_master", pools[0]) if pools else None

    def acts_on(self, domain, master=_UNKNOWN):
        """Whether this host's follower is the one to act on ``domain``: the host XAPI
        records as holding its catalog (platforms/xapi_catalog.py), else (no key: an older
        livesnap's catalog) ``owner``; a session that cannot say which host it is on acts
        on every VM."""
        here = self.this_host()
        if here is None:
            return True
        held = xapi_catalog.holder(domain)
        if held is not None:
            # the host XAPI records as holding the VM's catalog acts, wherever the VM runs
            # (a catalog here that is not it is a stale one: left alone)
            mine = held == self.platform.call("host.get_uuid", here).lower()
            if not mine:
                log.debug("VM %s: its catalog is host %s's, not this one's", domain.uuid, held)
            return mine
        if master is _UNKNOWN:
            master = self.master()
        lvhd = any(on_lvhd(d.path) for d in domain.disks())
        who = owner(domain.record, lvhd, master or here)
        if who != here:
            log.debug("VM %s (%s, %s): host %s's follower acts on it, not this one", domain.uuid,
                      domain.record.get("power_state"), "LVHD" if lvhd else "file SR", who)
        return who == here

    # -- the comparison ----------------------------------------------------------------------

    def pending(self, vms=None):
        """{vm uuid: [SR uuids]} of the VMs (of ``vms`` if given) with a snapshot face whose
        VDI XAPI no longer has (deleted through XAPI: SM's vdi_delete), or with an operation
        a killed command left open (``recover``: its hold on SM's GC ends there)."""
        out = {}
        for vm, (faces, open_srs) in sorted(read_catalogs(self.state_dir).items()):
            if vms is not None and vm not in vms:
                continue
            srs = set(open_srs or [])      # an operation left open: recovered as for a face
            for snapshot, disk, path, vdi_uuid in faces:
                if not self.platform.exists("VDI", vdi_uuid):
                    log.debug("VM %s: snapshot %s's VDI %s (disk %s) is gone from XAPI",
                              vm, snapshot, vdi_uuid, disk)
                    srs.add(sr_of(path))
            if srs or open_srs is not None:
                out[vm] = sorted(s for s in srs if s)
        return out

    def reconcile(self):
        """Every catalog compared with XAPI once: a VM XAPI no longer has is reported (its
        catalog removed once nothing is left of it), a VM with a snapshot face gone is acted
        on (``follow_vm``). [result] of what was reported."""
        results = []
        alive, gone = set(), set()
        for vm in catalog_vms(self.state_dir):
            if self.platform.exists("VM", vm):
                alive.add(vm)
                self.gone.discard(vm)
            else:
                gone.add(vm)
                results.append(self.vm_gone(vm))
        pending = self.pending(alive)
        master = _UNKNOWN
        now = time.monotonic()
        for vm, srs in sorted(pending.items()):
            if self.stopper is not None and self.stopper.stopping():
                break
            if vm in self.retry and self.retry[vm][0] > now:
                log.debug("VM %s: tried again in %.0f s", vm, self.retry[vm][0] - now)
                continue
            if master is _UNKNOWN and self.this_host() is not None:
                master = self.master()
            results.append(self.follow_vm(vm, srs, master))
        for vm in set(self.retry) - set(pending):
            del self.retry[vm]
        for vm in set(self.told) - set(pending) - gone:
            del self.told[vm]
        return [r for r in results if r is not None]

    def vm_gone(self, vm):
        """A VM XAPI no longer has (``xe vm-uninstall``): its images are SM's GC's garbage;
        reported once with what is left, and once more when its catalog is removed."""
        left = None
        if self.forget_if_done is not None:
            try:
                left = self.forget_if_done(vm)
            except Busy as e:
                log.debug("VM %s is gone from XAPI; its catalog is in use: %s", vm, e)
                return None
            except Error as e:
                return self._tell(vm, "gone", {"vm_uuid": vm, "vm_gone": True,
                                               "error": str(e)},
                                  logging.WARNING, "VM %s is gone from XAPI; its catalog: %s",
                                  vm, e)
            if not left:
                self.gone.discard(vm)
                self.told.pop(vm, None)
                return self._report({"vm_uuid": vm, "vm_gone": True, "catalog_removed": True})
        if vm in self.gone:
            return None
        self.gone.add(vm)
        out = {"vm_uuid": vm, "vm_gone": True}
        if left:
            out["images_left"] = left
        log.info("VM %s is gone from XAPI: its images are left to SM's GC; its catalog stays "
                 "while any is left (%s)", vm, ", ".join(left or ["not checked"]))
        return self._report(out)

    def follow_vm(self, vm, srs, master=_UNKNOWN):
        """SM's GC held off ``srs``, the engine's ``reclaim`` of ``vm`` (it follows SM's
        deletes and merges, then merges what is left), if this host's follower is the one
        to act on it and SM is not busy with its VDIs. The result, or None (not this host's
        VM; a refusal already reported)."""
        out = {"vm_uuid": vm, "srs": srs}
        last = self.retry.pop(vm, None)
        try:
            try:
                domain = self.platform.lookup(vm)
            except DomainNotFound:
                return None                     # gone since: the next comparison says so
            if not self.acts_on(domain, master):
                self.told.pop(vm, None)
                return None
            # SM busy with a VDI, the wrong host (as the engine's preflight says): refused
            # before SM's GC is asked to stop
            targets = [d.target for d in domain.disks() if domain.snapshottable(d)]
            domain.refuse_busy(targets)
            domain.refuse_wrong_host(targets)
            with sm_gc.held_off_all(srs, self.sm_lock_dir, self.sm_ipc_dir,
                                    self.gc_timeout) as held:
                out["gc_aborted"] = held["aborted"]
                try:
                    out["result"] = self.engine.reclaim(vm)
                except InterruptedOperation:
                    # a livesnap command died mid-operation: finished first (the catalog
                    # follows SM only with no operation open)
                    out["recovered"] = self.engine.recover(vm)
                    out["result"] = self.engine.reclaim(vm)
        except (Busy, StorageBusy) as e:
            # another livesnap command holds the VM: soon; SM busy with a VDI: backing off
            fixed = isinstance(e, Busy) and not isinstance(e, SmGcBusy)
            delay = self._retry_later(vm, RETRY_S if fixed else BUSY_CAP_S, last)
            out.update(error=str(e), retry=True)
            return self._tell(vm, "busy", out, logging.INFO,
                              "VM %s: %s; tried again in %.0f s", vm, e, delay)
        except WrongHost as e:
            self._retry_later(vm, BUSY_CAP_S, last)
            out.update(error=str(e), wrong_host=True)
            return self._tell(vm, "wrong_host", out, logging.WARNING,
                              "VM %s is this follower's, but: %s", vm, e)
        except Interrupted:
            raise
        except Error as e:
            if isinstance(e, XapiError) and xapi_link.is_lost(e):
                raise
            self._retry_later(vm, FAILED_CAP_S, last)
            out["error"] = str(e)
            return self._tell(vm, "error", out, logging.ERROR,
                              "VM %s: the merge after SM's delete failed: %s", vm, e)
        except Exception as e:          # a service goes on with the other VMs
            self._retry_later(vm, FAILED_CAP_S, last)
            out["error"] = "%s: %s" % (e.__class__.__name__, e)
            return self._tell(vm, "error", out, logging.ERROR, "VM %s: the merge after SM's "
                              "delete failed", vm, exc_info=True)
        self.told.pop(vm, None)
        return self._report(out)

    def _retry_later(self, vm, cap, last):
        """When to try ``vm`` again: 2 s after the first refusal, then twice as long each
        time (``last``: the previous (when, delay)) up to ``cap``. Returns the delay."""
        delay = RETRY_S if last is None else min(last[1] * 2, cap)
        self.retry[vm] = (time.monotonic() + delay, delay)
        return delay

    def _tell(self, vm, kind, out, level, msg, *args, **kw):
        """A refusal or failure logged (at ``level``) and reported once, until it changes or
        the VM is done; the same again only at debug level (returns None)."""
        key = (kind, out.get("error"))
        if self.told.get(vm) == key:
            log.debug(msg, *args)
            return None
        self.told[vm] = key
        log.log(level, msg, *args, **kw)
        return self._report(out)

    # -- the service -------------------------------------------------------------------------

    def run(self, timeout=WAIT_S, stop=None):
        """Reconcile once, then follow XAPI's events until SIGTERM/SIGINT or ``stop()``:
        each batch with a ``del`` event (a VDI or VM record gone) reconciles again, as do
        a retry that is due and the periodic comparison (``reconcile_interval``). A lost
        link to xapi is made again (``connect``) and followed by a new token and a
        comparison. Returns the stop signal's number, or None."""
        with xapi_link.Stopper(stop) as stopper:
            self.stopper = stopper
            link = None
            if self.connect is not None:
                link = xapi_link.Link(self.platform, self.connect, stopper)
            try:
                self._follow(link, stopper, timeout)
            except xapi_link.Stopped:
                pass
            except Interrupted as e:
                log.warning("stopped by signal %d during a merge: the follower finishes its "
                            "operation when it starts again", e.signo)
            finally:
                self.stopper = None
                if link is not None:
                    link.close()
            if stopper.signo is not None:
                log.info("stopped by signal %d", stopper.signo)
            return stopper.signo

    def _follow(self, link, stopper, timeout):
        if self.platform.session is None:
            link.up()
        token = None
        due = 0.0                                    # of the next full comparison
        while not stopper.stopping():
            try:
                if token is None:
                    # a token first, then the comparison: a delete after the token comes
                    # as an event, one before it is found by the comparison
                    token = self.platform.call("event.from", CLASSES, "", 0.0).get("token", "")
                    due = self._reconcile()
                    continue
                now = time.monotonic()
                retry = min([when for when, _ in self.retry.values()] or [due])
                wait = max(0.0, min(timeout, due - now, retry - now))
                try:
                    got = stopper.wait(self.platform.call, "event.from", CLASSES, token, wait)
                except XapiError as e:
                    if isinstance(e.details, list) and e.details and e.details[0] in (
                            "EVENTS_LOST", "EVENT_FROM_TOKEN_PARSE_FAILURE"):
                        log.info("XAPI's events were lost (%s): comparing again", e.details[0])
                        token = None
                        continue
                    raise
                token = got.get("token", token)
                now = time.monotonic()
                if any(ev.get("operation") == "del" for ev in got.get("events") or []) or \
                        now >= due or any(when <= now for when, _ in self.retry.values()):
                    due = self._reconcile()
            except XapiError as e:
                if link is None or not xapi_link.is_lost(e):
                    raise
                link.lost(e)
                self.here = _UNKNOWN
                token = None

    def _reconcile(self):
        """``reconcile``; a failure that is not a lost link is logged, not fatal. Returns
        when the next full comparison is due."""
        try:
            self.reconcile()
        except (Interrupted, XapiError) as e:
            if not isinstance(e, XapiError) or xapi_link.is_lost(e):
                raise
            self._failed(e)
        except Error as e:
            self._failed(e)
        return time.monotonic() + self.reconcile_interval

    def _failed(self, e):
        log.error("comparing the catalogs with XAPI failed: %s", e)
        due = time.monotonic() + self.reconcile_interval
        for vm, (when, delay) in list(self.retry.items()):   # not again at once
            self.retry[vm] = (max(when, due), delay)


def json_report(stream):
    """A ``report`` writing one JSON line per VM acted on."""
    def report(out):
        stream.write(json.dumps(out, sort_keys=True) + "\n")
        stream.flush()
    return report

