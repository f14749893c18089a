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
vm-uninstall`` of the VM) is reported once (``vm_gone``) and left to SM's GC.

Python 3.6, stdlib only; the XenAPI session is the caller's (``xapi.connect_local`` on a
host).
"""
import glob
import json
import logging
import os

from livesnap.errors import Busy, Error, InterruptedOperation
from livesnap.platforms import sm_gc
from livesnap.platforms.xapi import XapiError, image_uuid, is_uuid

log = logging.getLogger(__name__)

CLASSES = ["vdi", "vm"]
RETRY_S = 2.0               # a VM busy with another livesnap command: tried again after this


def sr_of(path):
    """The SR uuid an image path lies in (``<mount>/<sr>/<uuid>.vhd``,
    ``/dev/VG_XenStorage-<sr>/VHD-<uuid>``), or None."""
    d = os.path.basename(os.path.dirname(path))
    if d.startswith("VG_XenStorage-"):
        d = d[len("VG_XenStorage-"):]
    return d.lower() if is_uuid(d) else None


def catalog_faces(state_dir):
    """{vm uuid: [(snapshot, disk, image path, vdi uuid)]} of every snapshot face (a
    snapshot's leaf image named by a VDI uuid: SM's layout) in the state directory's
    catalogs."""
    from livesnap.catalog import Catalog
    from livesnap.model.tree import SNAPSHOT
    out = {}
    for path in sorted(glob.glob(os.path.join(state_dir, "*.db"))):
        vm = os.path.basename(path)[:-len(".db")]
        if not is_uuid(vm):
            continue
        try:
            cat = Catalog(path)
        except Error as e:
            log.warning("catalog %s not read: %s", path, e)
            continue
        try:
            tree = cat.load_tree()
        finally:
            cat.close()
        for n in sorted(tree.nodes.values(), key=lambda n: n.path):
            u = image_uuid(n.path)
            if n.state == SNAPSHOT and n.snapshot and u and not tree.children(n.id):
                out.setdefault(vm, []).append((n.snapshot, n.disk, n.path, u))
    return out


class Follower(object):
    """Follows XAPI for the catalogs in ``state_dir``: ``platform`` an ``XapiPlatform``,
    ``engine`` an ``Engine`` on it (made by the front end: platforms do not drive the
    engine)."""

    def __init__(self, platform, engine, state_dir, gc_timeout=60.0, report=None):
        self.platform = platform
        self.engine = engine
        self.state_dir = state_dir
        self.sm_lock_dir = platform.sm_lock_dir
        self.sm_ipc_dir = platform.sm_ipc_dir
        self.gc_timeout = gc_timeout
        self.report = report            # f(dict) for each VM acted on, e.g. a JSON line
        self.retry = set()              # VMs to try again (another command held them)
        self.gone = set()               # VMs XAPI no longer has, reported once

    def pending(self):
        """{vm uuid: [SR uuids]} of the VMs with a snapshot face whose VDI XAPI no longer
        has (deleted through XAPI: SM's vdi_delete)."""
        out = {}
        for vm, faces in sorted(catalog_faces(self.state_dir).items()):
            srs = set()
            for snapshot, disk, path, vdi_uuid in faces:
                if not self.platform.exists("VDI", vdi_uuid):
                    log.info("VM %s: snapshot %s's VDI %s (disk %s) is gone from XAPI",
                             vm, snapshot, vdi_uuid, disk)
                    srs.add(sr_of(path))
            if srs:
                out[vm] = sorted(s for s in srs if s)
        return out

    def reconcile(self):
        """Act on every pending VM once; [result] (each also passed to ``report``)."""
        results = []
        for vm, srs in sorted(self.pending().items()):
            if vm in self.gone:
                continue
            if not self.platform.exists("VM", vm):
                # ``xe vm-uninstall``: the VM, its disks and its snapshots destroyed; what
                # is left (hidden base copies with no child) is SM's GC's garbage
                self.gone.add(vm)
                out = {"vm_uuid": vm, "srs": srs, "vm_gone": True}
                log.info("VM %s is gone from XAPI: its images are left to SM's GC", vm)
                if self.report is not None:
                    self.report(out)
                results.append(out)
                continue
            results.append(self.follow_vm(vm, srs))
        return results

    def follow_vm(self, vm, srs):
        """SM's GC held off ``srs``, the engine's ``reclaim`` of ``vm`` (it follows SM's
        deletes and merges, then merges what is left)."""
        out = {"vm_uuid": vm, "srs": srs}
        try:
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
            self.retry.discard(vm)
        except Busy as e:
            self.retry.add(vm)
            out["error"] = str(e)
            out["retry"] = True
            log.info("VM %s busy, tried again in %.0f s: %s", vm, RETRY_S, e)
        except Error as e:
            out["error"] = str(e)
            log.error("VM %s: the merge after SM's delete failed: %s", vm, e)
        if self.report is not None:
            self.report(out)
        return out

    def run(self, timeout=30.0, stop=None):
        """Reconcile once, then follow XAPI's events until ``stop()`` says so (or forever):
        each batch with a ``del`` event (a VDI or VM record gone) reconciles again, and
        VMs that were busy are tried again every ``RETRY_S``."""
        # a token first, then the comparison: a delete after the token comes as an event,
        # one before it is found by the comparison
        token = self.platform.call("event.from", CLASSES, "", 0.0).get("token", "")
        self.reconcile()
        while stop is None or not stop():
            wait = RETRY_S if self.retry else timeout
            try:
                got = self.platform.call("event.from", CLASSES, token, float(wait))
            except XapiError as e:
                if e.details and e.details[0] in ("EVENTS_LOST",
                                                  "EVENT_FROM_TOKEN_PARSE_FAILURE"):
                    token = ""
                    self.reconcile()
                    continue
                raise
            token = got.get("token", token)
            events = got.get("events") or []
            if any(ev.get("operation") == "del" for ev in events):
                self.reconcile()
            elif self.retry:
                for vm, srs in sorted(self.pending().items()):
                    if vm in self.retry:
                        self.follow_vm(vm, srs)


def json_report(stream):
    """A ``report`` writing one JSON line per VM acted on."""
    def report(out):
        stream.write(json.dumps(out, sort_keys=True) + "\n")
        stream.flush()
    return report

