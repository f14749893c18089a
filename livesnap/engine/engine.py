"""The engine: everything a front end asks of livesnap, for one domain at a time.

Each mutating command runs under the domain's lock and goes through the same pipeline:
load (adopt on first use) and validate the tree against the images, preflight, plan,
journal the plan, execute step by step (each step's effect on the tree written in the same
transaction that marks it done), finish. ``recover`` continues an interrupted operation
from its last done step to "after"; an operation whose first step failed without effect is
rolled back to "before".
"""
import datetime
import logging
import os

from livesnap.datapaths import LibvirtNamer
from livesnap.datapaths.offline import OfflineDatapath
from livesnap import faults
from livesnap.engine import adopt, check, follow, foreign, names, sm_follow, space, users
from livesnap.engine.session import SessionContext, SignalCatcher
from livesnap.text import check_description, check_snapshot_name, printable
from livesnap.errors import (BadImage, Error, Interrupted, InterruptedOperation,
                             PathOutsideStorage, UnsupportedDisks, UnusablePath, UsageError,
                             WrongState)
from livesnap.errors import DataFileImage
from livesnap import statedir
from livesnap.model import planner as P
from livesnap.model.tree import HIDDEN

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = statedir.DEFAULT_STATE_DIR


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


class Engine(object):
    def __init__(self, connect=None, state_dir=None, max_depth=P.DEFAULT_MAX_DEPTH,
                 storage_dirs=None, quiesce=False, quiesce_timeout=10.0, platform=None):
        """``platform`` finds domains (``lookup(ident)``): libvirt at ``connect`` unless
        given (e.g. ``XenXmlPlatform``, ``XapiPlatform``)."""
        self.uri = connect
        self.platform = platform
        self.state_dir = statedir.resolve(state_dir)      # this process's environment
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
            raise UsageError(reason="the longest backing chain allowed must be a whole number "
                                    "of at least 1, not %r" % (max_depth,))
        self.max_depth = max_depth
        self.storage_dirs = [os.path.realpath(d) for d in (storage_dirs or [])]
        self.quiesce = quiesce
        self.quiesce_timeout = quiesce_timeout
        self._conn = None

    # -- plumbing ---------------------------------------------------------------------------

    def lookup(self, ident):
        if self.platform is None:
            from livesnap.platforms.libvirt_domain import LibvirtPlatform
            self.platform = LibvirtPlatform(self.uri)
        return self.platform.lookup(ident)

    def _session(self, ident, lock=True, dry_run=False, preflight=None):
        """``preflight(domain)`` runs under the lock, before the catalog is opened (a
        refusal then leaves no catalog behind for a domain seen for the first time)."""
        return SessionContext(self, ident, lock, dry_run, preflight)

    def datapath_for(self, domain):
        """The datapath follows the domain's state: block jobs in QEMU while it runs,
        qemu-img while it is shut off; on Xen, tapdisk while it serves the disks, the VHD
        engine directly when it does not."""
        if domain.kind == "xen":
            from livesnap.datapaths import vhd_files
            if domain.is_running():
                elsewhere = getattr(domain, "served_elsewhere", None)   # XAPI: another host
                if elsewhere is not None and elsewhere():
                    from livesnap.datapaths import vhd_remote
                    return vhd_remote.RemoteTapdiskDatapath(domain)
                return vhd_files.TapdiskDatapath(domain)
            return vhd_files.VhdOfflineDatapath(domain)
        if domain.is_running():
            from livesnap.datapaths.libvirt_live import LibvirtLiveDatapath
            return LibvirtLiveDatapath(domain, quiesce=self.quiesce,
                                       quiesce_timeout=self.quiesce_timeout)
        return OfflineDatapath(domain)

    def _check_storage(self, path):
        if self.storage_dirs:
            real = os.path.realpath(path)
            from livesnap.tools import lvm
            if lvm.split_path(path) is not None:
                # an LV's link leads to /dev/mapper: its VG's directory is what is allowed
                real = os.path.join(os.path.realpath(os.path.dirname(path)),
                                    os.path.basename(path))
            if not any(real == d or real.startswith(d + os.sep) for d in self.storage_dirs):
                raise PathOutsideStorage(path, ":".join(self.storage_dirs))
        self._check_data_file(path)

    def _check_data_file(self, path):
        """A qcow2 image with an external data file is refused (its data file outside the
        storage directories, or named relative to whichever directory QEMU runs in:
        ``PathOutsideStorage`` for the data file)."""
        from livesnap import qcow2
        data = qcow2.data_file(path)
        if data is None:
            return
        if data and self.storage_dirs:
            real = os.path.realpath(data) if os.path.isabs(data) else data
            if not any(real == d or real.startswith(d + os.sep) for d in self.storage_dirs):
                raise PathOutsideStorage(data, ":".join(self.storage_dirs))
        raise DataFileImage(path, data or "named only in QEMU's options")

    # -- loading and validating the tree ---------------------------------------------------

    def _adopt(self, domain):
        # a running Xen domain's leaves are held open read-write by tapdisks (as
        # datapath_for): their BATs are not read
        open_leaves = domain.kind == "xen" and domain.is_running()
        return adopt.adopt(domain, self.max_depth, self._check_storage, open_leaves=open_leaves)

    def load(self, session, validate=True, datapath=None):
        cat, domain = session.catalog, session.domain
        if cat.is_empty():
            tree = self._adopt(domain)
            users.refuse_shared(domain, tree)       # before the catalog keeps it
            cat.save_tree(tree)                     # a dry run's catalog is in memory
            if tree.snapshots and not session.dry_run:
                self._sync_metadata(session, tree)
            tree = cat.load_tree()
        else:
            tree = follow.in_session(self, session, cat.load_tree(), validate,
                                     check.image_problems)
        if datapath is not None and hasattr(datapath, "prepare"):
            datapath.prepare(tree)           # e.g. activate the LVs of the tree's images
        if not cat.is_empty():
            tree = sm_follow.in_session(self, session, tree)
        if validate:
            self._validate(domain, tree, datapath)
        session.tree = tree
        return tree

    def _validate(self, domain, tree, datapath=None):
        """Every node's image opens, is of the recorded format and has the recorded parent;
        the domain's disks use the active nodes. Refreshes allocation sizes. A leaf that a
        tapdisk holds open is not read (its metadata on disk is stale until a pause)."""
        opaque = set()
        if datapath is not None and datapath.name == "tapdisk":
            opaque = set(tree.active.values())
        for n in tree.nodes.values():
            self._check_storage(n.path)
        from livesnap.datapaths import own_files
        own_files.pin(os.path.dirname(n.path) for n in tree.nodes.values())
        for problem in check.image_problems(domain, tree, opaque):
            raise problem
        for problem in tree.validate():
            raise BadImage(self.state_dir, "catalog is inconsistent: %s" % problem)
        users.refuse_shared(domain, tree)

    # -- preflight ---------------------------------------------------------------------------

    def _preflight_space(self, plan, datapath=None):
        space.preflight(plan, live=getattr(datapath, "name", None) == "libvirt-live")

    def _users(self, session, tree):
        """{image path: [user, ...]} of the tree's images something else reads."""
        return users.find(session.domain, tree, self.storage_dirs)

    def _preflight_paths(self, session, plan):
        """Every image path the plan creates (new leaves, renamed frozen images, kept
        leaves, internal images) is one the file system or LVM can hold, in a directory that
        takes new files: checked before anything is journaled."""
        existing = [n.path for n in session.tree.nodes.values()] if session.tree else []
        for path in names.new_paths(plan.steps, existing):
            problem = names.path_problem(path) or names.place_problem(path)
            if problem is not None:
                raise UnusablePath(printable(path), problem)

    def _planner(self, session, datapath=None, users=None):
        if session.domain.kind == "xen":
            from livesnap.datapaths.vhd_files import TapdiskNamer
            namer = TapdiskNamer(getattr(session.domain, "image_names", "name"))
        else:
            namer = LibvirtNamer(session.domain.name)
        return P.Planner(session.domain.name, namer, max_depth=self.max_depth,
                         merge_ops=getattr(datapath, "merge_ops", None),
                         needs_internal=getattr(datapath, "needs_internal", None),
                         users=users, faces=getattr(session.domain, "layout", None) == "sm",
                         empty=getattr(datapath, "empty", None))

    def _sync_metadata(self, session, tree):
        """Keep libvirt's snapshot list (XAPI: its VDI records) in step; a failure here does
        not undo the operation."""
        if session.domain.kind != "libvirt":
            sync = getattr(session.domain, "sync_metadata", None)
            if sync is not None:
                try:
                    sync(tree)
                except Error as e:
                    log.warning("XAPI's records of %s not updated: %s (an SR scan will do it)",
                                session.domain.name, e)
            return
        from livesnap.platforms import libvirt_snapshots
        try:
            libvirt_snapshots.sync(session.domain, tree, session.catalog.known_names)
        except Error as e:
            log.warning("libvirt snapshot metadata of %s not updated: %s ('livesnap recover "
                        "%s' brings it in step)", session.domain.name, e, session.domain.name)

    def _no_interrupted(self, session):
        op = session.catalog.unfinished()
        if op is not None:
            raise InterruptedOperation(session.domain.name, op.id, op.op)

    # -- executing ---------------------------------------------------------------------------

    def _execute(self, session, datapath, plan, op_id, start=0):
        """Carry out steps ``start``.. of a journaled plan; returns the pause times seen and
        the merges done ({disk, node, method, fallback, pause_ms})."""
        tree = session.catalog.load_tree()
        pauses = []
        merges = []
        stop = SignalCatcher()
        with stop:
            for i in range(start, len(plan.steps)):
                step = plan.steps[i]
                faults.point(plan.op, "before", i)
                try:
                    facts = datapath.run(step) or {}
                except Exception as e:
                    if i == 0 and step["op"] in ("snapshot", "new_leaf"):
                        datapath.abandon(step)
                        session.catalog.finish(op_id, "rolled-back", str(e))
                    else:
                        session.catalog.finish(op_id, "failed", str(e))
                        log.error("operation #%d stopped at step %d (%s); 'livesnap recover %s' "
                                  "continues it", op_id, i, step["op"], session.domain.name)
                    raise
                # "measured": "pause" (livesnap timed the pause itself) or "call" (the
                # duration of the call that paused, e.g. libvirt's: an upper bound)
                measured = facts.get("measured", "pause")
                step_pauses = facts.get("pauses_ms")
                if step_pauses is None and facts.get("pause_ms") is not None:
                    step_pauses = [facts["pause_ms"]]
                for ms in step_pauses or []:
                    pauses.append({"step": step["op"], "disk": step.get("disk"),
                                   "ms": ms, "measured": measured})
                if facts.get("replace_step"):
                    # the datapath merged another way than planned (active commit that did
                    # not converge -> pull): journal what was really done
                    step = plan.steps[i] = facts["replace_step"]
                    session.catalog.set_plan(op_id, plan)
                if step["op"] in ("commit", "pull", "fold"):
                    merges.append({"disk": step["disk"], "snapshot_image": step["path"],
                                   "method": step["op"], "fallback": "fallback" in facts,
                                   "pause_ms": facts.get("pause_ms"),
                                   "call_ms": facts.get("pause_ms") if measured == "call"
                                   else None})
                    if "rounds" in facts:       # a fold's rounds around the running leaf
                        merges[-1]["rounds"] = facts["rounds"]
                faults.point(plan.op, "after", i)
                P.apply(tree, step)
                last = i + 1 == len(plan.steps)
                session.catalog.step_done(op_id, i, tree, last=last)
                if stop.signo is not None and not last:
                    raise Interrupted(stop.signo, session.domain.name)
        if start >= len(plan.steps):
            session.catalog.finish(op_id)
        session.tree = tree
        return pauses, merges

    def _run(self, session, datapath, plan, dry_run):
        foreign.refuse_bitmaps(session.domain, plan)
        refuse_busy = getattr(session.domain, "refuse_busy", None)    # XAPI: SM at work
        if refuse_busy is not None:
            refuse_busy(P.plan_disks(plan), plan.op)
        result = dict(plan.result)
        self._preflight_paths(session, plan)
        if dry_run:
            session.dry_run = True
            result["dry_run"] = True
            result["plan"] = P.plan_summary(plan)
            result["steps"] = plan.steps
            result["datapath"] = datapath.name
            return result
        self._preflight_space(plan, datapath)
        plan.result["datapath"] = datapath.name     # the hook reads which datapath it needs
        # (SM's GC held off before the journal: a Busy leaves nothing to recover)
        _gc_hold(session.domain, True)          # outlives a crash: recover lets go
        with sm_follow.merge_guard(session.domain, plan.steps):
            op_id = session.catalog.begin(plan)
            try:
                pauses, merges = self._execute(session, datapath, plan, op_id)
            except Exception:
                if session.catalog.unfinished() is None:        # rolled back
                    _gc_hold(session.domain, False)
                raise
        _gc_hold(session.domain, False)
        faults.point(plan.op, "committed", 0)
        self._sync_metadata(session, session.tree)
        # every pause of the guest's IO, and the longest one (what the guest felt most)
        result["pauses"] = pauses
        result["pause_ms"] = max(p["ms"] for p in pauses) if pauses else None
        result["pause_total_ms"] = sum(p["ms"] for p in pauses) if pauses else None
        # where livesnap cannot time the pause (libvirt), the call's duration stands for it
        calls = [p["ms"] for p in pauses if p["measured"] == "call"]
        result["call_ms"] = max(calls) if calls else None
        result["pause_measured"] = ("call" if calls else "pause") if pauses else None
        if plan.op in ("delete", "reclaim", "revert"):
            result["merges"] = merges
        result["datapath"] = datapath.name
        return result

    # -- commands ----------------------------------------------------------------------------

    def create(self, domain, name, description="", disks=None, dry_run=False,
               skip_unsupported=False):
        check_snapshot_name(name)
        description = check_description("" if description is None else description)
        with self._session(domain, dry_run=dry_run, preflight=_preflight_domain) as s:
            self._no_interrupted(s)
            datapath = s.datapath = self.datapath_for(s.domain)
            if self.quiesce:
                self._check_quiesce(s.domain)
            skipped = self._left_out(s.domain, disks, skip_unsupported)
            tree = self.load(s, datapath=datapath)
            found = self._users(s, tree) if tree.reclaimable() else None
            plan = self._planner(s, datapath, found).create(tree, name, now_iso(), description,
                                                            disks)
            if self.quiesce:
                plan.steps[0]["quiesce"] = True    # recover then knows to thaw
            result = self._run(s, datapath, plan, dry_run)
            if not dry_run:
                result["disks"] = self._snapshot_disks(s.tree, name)
            taken = {it["disk"] for it in plan.steps[0]["items"]}
            result["skipped"] = [x for x in skipped if x["target"] not in taken] + [
                {"target": t, "reason": "left out with --disk"}
                for t in sorted(set(tree.active) - taken)]
            return result

    def _left_out(self, domain, disks, skip_unsupported):
        """[{target, reason}] of the domain's disks livesnap cannot snapshot; refused
        (``UnsupportedDisks``) unless ``--disk`` leaves them out or ``skip_unsupported``.
        A disk named with ``--disk`` that cannot be snapshotted is refused with its reason."""
        find = getattr(domain, "unsupported_disks", None)
        found = find() if find is not None else []
        for t, why in found:
            if disks and t in disks:
                raise UsageError(reason="disk %s of '%s' cannot be snapshotted: %s"
                                 % (t, domain.name, why))
        left = [(t, why) for t, why in found if not disks or t not in disks]
        if left and not disks and not skip_unsupported:
            raise UnsupportedDisks(domain.name, left)
        return [{"target": t, "reason": why} for t, why in left]

    def _check_quiesce(self, domain):
        if domain.kind != "libvirt":
            raise UsageError(reason="--quiesce is for libvirt domains (QEMU guest agent); "
                                    "'%s' is a Xen domain" % domain.name)
        if not domain.is_running():
            raise UsageError(reason="--quiesce needs '%s' running (a shut-off domain has no "
                                    "file systems to freeze)" % domain.name)
        if not domain.has_guest_agent():
            raise UsageError(reason="--quiesce needs the QEMU guest agent, and '%s' has no "
                                    "org.qemu.guest_agent.0 channel" % domain.name)

    def delete(self, domain, name, dry_run=False):
        with self._session(domain, dry_run=dry_run, preflight=_preflight_domain) as s:
            self._no_interrupted(s)
            datapath = s.datapath = self.datapath_for(s.domain)
            tree = self.load(s, datapath=datapath)
            planner = self._planner(s, datapath, self._users(s, tree))
            if name in ((s.followed or {}).get("deleted") or ()):
                # its VDIs were deleted through XAPI (xe, XenCenter): what is left is the
                # merge of its base copies
                r = self._reclaim(s, datapath, planner.reclaim(tree), dry_run)
                r.update(snapshot=name, deleted_by="xapi", action="merged" if r.get(
                    "merges") else "deleted")
                return r
            plan = planner.delete(tree, name)
            return self._run(s, datapath, plan, dry_run)

    def revert(self, domain, name, keep_current=None, dry_run=False):
        if keep_current is not None:
            check_snapshot_name(keep_current)
        with self._session(domain, dry_run=dry_run) as s:
            self._no_interrupted(s)
            state = s.domain.state_name()
            if state != "shut off":
                hint = getattr(s.domain, "how_to_stop", None)
                raise WrongState(s.domain.name, state, hint(state) if hint else
                                 "revert needs the domain shut off: virsh shutdown %s (or "
                                 "virsh destroy %s), then revert again" % (s.domain.name,
                                                                           s.domain.name))
            datapath = s.datapath = self.datapath_for(s.domain)
            tree = self.load(s, datapath=datapath)
            plan = self._planner(s, datapath, self._users(s, tree)).revert(
                tree, name, now_iso(), keep_current)
            return self._run(s, datapath, plan, dry_run)

    def reclaim(self, domain, dry_run=False):
        """Reclaim hidden nodes that are down to one child (what hooks start after a stop)."""
        with self._session(domain, dry_run=dry_run, preflight=_preflight_domain) as s:
            self._no_interrupted(s)
            datapath = s.datapath = self.datapath_for(s.domain)
            tree = self.load(s, datapath=datapath)
            plan = self._planner(s, datapath, self._users(s, tree)).reclaim(tree)
            return self._reclaim(s, datapath, plan, dry_run)

    def _reclaim(self, s, datapath, plan, dry_run):
        if not plan.steps:
            r = dict(plan.result, pause_ms=None)
        else:
            r = self._run(s, datapath, plan, dry_run)
        if s.followed and "faces_deleted" in s.followed:
            r["followed_sm"] = s.followed           # what SM had done (engine/sm_follow.py)
        return r

    def recover(self, domain):
        with self._session(domain) as s:
            op = s.catalog.unfinished()
            datapath = s.datapath = self.datapath_for(s.domain)
            if op is None:
                healed = datapath.heal() if hasattr(datapath, "heal") else []
                r = {"domain": s.domain.name, "recovered": None, "unpaused": healed,
                     "metadata": self._bring_metadata_in_step(s)}
                if getattr(s.domain, "vdi_exists", None) is not None:    # XAPI: SM's deletes
                    r["followed_sm"] = sm_follow.reclaim_followed(self, s, datapath)
                _gc_hold(s.domain, False)       # a kill before the journal's first entry
                return r
            plan = P.Plan.from_dict(op.plan)
            impossible = _impossible_path(plan, op.steps_done, s.catalog.load_tree())
            if impossible is not None:
                r = self._roll_back_impossible(s, datapath, op, plan, *impossible)
                _gc_hold(s.domain, False)
                return r
            log.info("recovering operation #%d (%s) from step %d of %d", op.id, op.op,
                     op.steps_done, len(plan.steps))
            with sm_follow.merge_guard(s.domain, plan.steps[op.steps_done:]):
                self._execute(s, datapath, plan, op.id, start=op.steps_done)
            _gc_hold(s.domain, False)
            # a crash inside a pause may have left a tapdisk paused although its step is
            # done: nothing stays paused after recover
            healed = datapath.heal() if hasattr(datapath, "heal") else []
            self._sync_metadata(s, s.tree)
            return {"domain": s.domain.name, "recovered": op.id, "op": op.op,
                    "steps_done_before": op.steps_done, "steps": len(plan.steps),
                    "result": plan.result, "unpaused": healed}

    def _bring_metadata_in_step(self, s):
        """libvirt's snapshot metadata made to show the catalog's snapshots again where it
        differs (a crash between the catalog's commit and its update, a definition removed
        by hand); snapshots livesnap never had are left alone. What changed, as
        ``[[change, name]]``; a failure is the command's error."""
        if s.domain.kind != "libvirt":
            sync = getattr(s.domain, "sync_metadata", None)   # XAPI: its records
            if sync is None:
                return []
            return sync(self.load(s, validate=False)) or []
        from livesnap.platforms import libvirt_snapshots
        tree = self.load(s, validate=False)
        changed = libvirt_snapshots.sync(s.domain, tree, s.catalog.known_names)
        for change, name in changed:
            log.info("libvirt's snapshot metadata of %s: %s %s", s.domain.name, change, name)
        return [list(c) for c in changed]

    def _roll_back_impossible(self, s, datapath, op, plan, index, path, problem):
        """An operation journaled with an image path that can never exist (an older
        livesnap did not check): back to "before" when no step is marked done and nothing
        of the first step took effect (no image renamed; when a later step needs the path,
        the domain's disks still the catalog's); otherwise a clear error."""
        step = plan.steps[0]
        # an image renamed by the step (the VHD datapaths' frozen or kept leaf) is an effect
        # "before" cannot take back here
        tree = s.catalog.load_tree()
        known = {n.path for n in tree.nodes.values()}
        targets = [it.get("frozen_path") for it in step.get("items") or [step]]
        renamed = [p for p in targets + [step.get("kept_path")]
                   if p and p not in known and os.path.lexists(p)]
        sources = {d.target: d.path for d in s.domain.disks()}
        # a later step needs the path: step 0 must have left the domain's disks as they were
        untouched = index == 0 or all(sources.get(disk) == tree.nodes[nid].path
                                      for disk, nid in tree.active.items())
        if op.steps_done != 0 or renamed or not untouched or \
                step["op"] not in ("snapshot", "new_leaf", "internal_snapshot", "keep_leaf"):
            raise UnusablePath(printable(path), "%s; operation #%d (%s) needs it at step "
                               "%d of %d and cannot be finished by livesnap"
                               % (problem, op.id, op.op, index + 1, len(plan.steps)))
        reason = "cannot create an image at %s: %s" % (printable(path), problem)
        datapath.abandon(step)
        s.catalog.finish(op.id, "rolled-back", reason)
        log.warning("operation #%d (%s) rolled back: %s", op.id, op.op, reason)
        healed = datapath.heal() if hasattr(datapath, "heal") else []     # nothing paused
        s.tree = s.catalog.load_tree()
        self._sync_metadata(s, s.tree)
        return {"domain": s.domain.name, "recovered": op.id, "op": op.op,
                "steps_done_before": op.steps_done, "steps": len(plan.steps),
                "result": plan.result, "unpaused": healed, "rolled_back": True,
                "reason": reason}

    def snapshot_list(self, domain, include_hidden=False):
        with self._session(domain, lock=False) as s:
            tree = self.load(s, validate=False)
            snaps = sorted(tree.snapshots.values(), key=lambda x: (x.created, x.name))
            records = getattr(s.domain, "snapshot_records", None)     # XAPI: VM records
            records = records() if records is not None else None
            out = []
            for snap in snaps:
                if snap.state == HIDDEN and not include_hidden:
                    continue
                out.append({"name": snap.name, "state": snap.state,
                            "parent": tree.snapshot_parent(snap.name, include_hidden),
                            "created": snap.created, "description": snap.description,
                            "disks": self._snapshot_disks(tree, snap.name)})
                if records is not None:
                    out[-1]["xapi_snapshot"] = records.get(snap.name)
            return {"domain": s.domain.name, "current": tree.current_snapshot(),
                    "snapshots": out}

    def _snapshot_disks(self, tree, name):
        nodes = tree.snapshot_nodes(name)
        return [{"target": d, "image": tree.nodes[nodes[d]].path, "format": tree.nodes[nodes[d]].fmt}
                for d in sorted(nodes)]

    def check(self, domain, repair=False):
        """Compare the catalog with the images on disk; a list of problems (empty when sound).
        ``repair``: first bring the catalog in step from libvirt's metadata and the images
        (``follow.reconcile``; refused with the reason when they do not explain it)."""
        with self._session(domain) as s:
            if s.domain.kind == "xen" or not s.domain.is_running():
                s.datapath = self.datapath_for(s.domain)      # it makes the images readable
            repaired = None
            if repair:
                repaired = self._repair(s)
            r = check.check(self, s)
            if repair:
                r["repaired"] = repaired
            return r

    def _repair(self, s):
        from livesnap.engine import follow
        self._no_interrupted(s)
        if s.catalog.is_empty():
            return {"adopted": [], "gone": []}
        tree = s.catalog.load_tree()
        followed, changes = follow.reconcile(self, s, tree)
        if not follow.same(tree, followed):
            s.catalog.save_tree(followed)
            log.info("catalog of %s repaired: adopted %s, gone %s", s.domain.name,
                     changes["adopted"] or "nothing", changes["gone"] or "nothing")
        if s.domain.kind == "libvirt":
            from livesnap.platforms import libvirt_snapshots
            libvirt_snapshots.sync(s.domain, s.catalog.load_tree(), s.catalog.known_names)
        return changes


def _preflight_domain(domain):
    """Before a changing command reads or makes the domain's catalog: no foreign block job
    (libvirt), and (XAPI) this host is the one to act (``refuse_wrong_host``)."""
    foreign.refuse_jobs(domain)
    refuse_wrong_host = getattr(domain, "refuse_wrong_host", None)
    if refuse_wrong_host is not None:
        refuse_wrong_host([d.target for d in domain.disks() if domain.snapshottable(d)])


def _impossible_path(plan, start, tree):
    """(step index, path, why) of the first image path that steps ``start``.. of ``plan``
    would create and that can never exist, or None."""
    existing = {n.path for n in tree.nodes.values()}
    for i in range(start, len(plan.steps)):
        for path in names.new_paths([plan.steps[i]], existing):
            problem = names.path_problem(path)
            if problem is not None:
                return i, path, problem
    return None


def _gc_hold(domain, hold):
    """XAPI: SM's GC held off the domain's SRs across the operation, a crash included
    (platforms/sm_gc_hold.py); else nothing."""
    fn = getattr(domain, "gc_hold", None)
    if fn is not None:
        fn(hold)
