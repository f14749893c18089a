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
import signal

from livesnap.catalog import Catalog
from livesnap.datapaths import LibvirtNamer
from livesnap.datapaths import trash
from livesnap.datapaths.offline import OfflineDatapath
from livesnap.engine import adopt, check, faults
from livesnap.engine.names import check_snapshot_name
from livesnap.errors import (BadImage, Error, Interrupted, InterruptedOperation, NoSpace,
                             PathOutsideStorage, UsageError, WrongState)
from livesnap.lock import DomainLock
from livesnap.model import planner as P
from livesnap.model.tree import HIDDEN

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/livesnap"
SPACE_MARGIN = 1 << 20


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


class Session(object):
    """One command's hold on one domain: the domain, its catalog, its tree, a datapath."""

    def __init__(self, engine, domain, catalog):
        self.engine = engine
        self.domain = domain
        self.catalog = catalog
        self.tree = None
        self.datapath = None


class Engine(object):
    def __init__(self, connect=None, state_dir=None, max_depth=P.DEFAULT_MAX_DEPTH,
                 storage_dirs=None, quiesce=False, quiesce_timeout=10.0, platform=None):
        """``platform`` finds domains (``lookup(ident)``): libvirt at ``connect`` unless
        given (e.g. ``XenXmlPlatform``, ``XapiPlatform``)."""
        self.uri = connect
        self.platform = platform
        self.state_dir = state_dir or os.environ.get("LIVESNAP_STATE_DIR") or DEFAULT_STATE_DIR
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

    def _session(self, ident, lock=True):
        return _SessionContext(self, ident, lock)

    def datapath_for(self, domain):
        """The datapath follows the domain's state: block jobs in QEMU while it runs,
        qemu-img while it is shut off; on Xen, tapdisk while it serves the disks, the VHD
        engine directly when it does not."""
        if domain.kind == "xen":
            from livesnap.datapaths import vhd_files
            if domain.is_running():
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
            if not any(real == d or real.startswith(d + os.sep) for d in self.storage_dirs):
                raise PathOutsideStorage(path, ":".join(self.storage_dirs))

    # -- loading and validating the tree ---------------------------------------------------

    def _adopt(self, domain):
        # a running Xen domain's leaves are held open read-write by tapdisks (as
        # datapath_for): their BATs are not read
        open_leaves = domain.kind == "xen" and domain.is_running()
        return adopt.adopt(domain, self.max_depth, self._check_storage, open_leaves)

    def load(self, session, validate=True, datapath=None):
        cat, domain = session.catalog, session.domain
        if cat.is_empty():
            tree = self._adopt(domain)
            cat.save_tree(tree)
            if tree.snapshots:
                self._sync_metadata(session, tree)
        tree = cat.load_tree()
        if datapath is not None and hasattr(datapath, "prepare"):
            datapath.prepare(tree)           # e.g. activate the LVs of the tree's images
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
        for problem in check.image_problems(domain, tree, opaque):
            raise problem
        for problem in tree.validate():
            raise BadImage(self.state_dir, "catalog is inconsistent: %s" % problem)

    # -- preflight ---------------------------------------------------------------------------

    def _preflight_space(self, plan):
        need = {}
        for step in plan.steps:
            op = step["op"]
            if op == "commit":
                where, amount = step["path"], step["bytes"]
            elif op == "pull":
                where, amount = step["child_path"], step["bytes"]
            elif op in ("snapshot", "internal_snapshot"):
                for it in step.get("items") or [step]:
                    key = os.path.dirname(it["leaf_path"])
                    need[key] = need.get(key, 0) + _leaf_cost(it["leaf_path"])
                continue
            elif op == "new_leaf":
                where, amount = step["leaf_path"], _leaf_cost(step["parent_path"]) - SPACE_MARGIN
            else:
                continue
            key = os.path.dirname(where)
            need[key] = need.get(key, 0) + amount + SPACE_MARGIN
        by_dev = {}
        for directory, amount in need.items():
            dev, available = _available(directory)
            entry = by_dev.setdefault(dev, [directory, 0, available])
            entry[1] += amount
        for directory, amount, available in by_dev.values():
            if amount > available:
                raise NoSpace(directory, amount, available)

    def _planner(self, session, datapath=None):
        if session.domain.kind == "xen":
            from livesnap.datapaths.vhd_files import TapdiskNamer
            namer = TapdiskNamer(getattr(session.domain, "image_names", "name"))
        else:
            namer = LibvirtNamer(session.domain.name)
        return P.Planner(session.domain.name, namer, max_depth=self.max_depth,
                         merge_ops=getattr(datapath, "merge_ops", None),
                         needs_internal=getattr(datapath, "needs_internal", None))

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
            libvirt_snapshots.sync(session.domain, tree)
        except Error as e:
            log.warning("libvirt snapshot metadata of %s not updated: %s (run 'livesnap check "
                        "%s')", session.domain.name, e, session.domain.name)

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
        stop = _SignalCatcher()
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
                if facts.get("pause_ms") is not None:
                    pauses.append({"step": step["op"], "disk": step.get("disk"),
                                   "ms": facts["pause_ms"]})
                if facts.get("replace_step"):
                    # the datapath merged another way than planned (active commit that did
                    # not converge -> pull): journal what was really done
                    step = plan.steps[i] = facts["replace_step"]
                    session.catalog.set_plan(op_id, plan)
                if step["op"] in ("commit", "pull"):
                    merges.append({"disk": step["disk"], "snapshot_image": step["path"],
                                   "method": step["op"], "fallback": "fallback" in facts,
                                   "pause_ms": facts.get("pause_ms")})
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
        result = dict(plan.result)
        if dry_run:
            result["dry_run"] = True
            result["plan"] = P.plan_summary(plan)
            result["steps"] = plan.steps
            result["datapath"] = datapath.name
            return result
        self._preflight_space(plan)
        plan.result["datapath"] = datapath.name     # the hook reads which datapath it needs
        op_id = session.catalog.begin(plan)
        pauses, merges = self._execute(session, datapath, plan, op_id)
        self._sync_metadata(session, session.tree)
        # every pause of the guest's IO, and the longest one (what the guest felt most)
        result["pauses"] = pauses
        result["pause_ms"] = max(p["ms"] for p in pauses) if pauses else None
        result["pause_total_ms"] = sum(p["ms"] for p in pauses) if pauses else None
        if plan.op in ("delete", "reclaim", "revert"):
            result["merges"] = merges
        result["datapath"] = datapath.name
        return result

    # -- commands ----------------------------------------------------------------------------

    def create(self, domain, name, description="", disks=None, dry_run=False):
        check_snapshot_name(name)
        with self._session(domain) as s:
            self._no_interrupted(s)
            datapath = s.datapath = self.datapath_for(s.domain)
            if self.quiesce:
                self._check_quiesce(s.domain)
            tree = self.load(s, datapath=datapath)
            plan = self._planner(s, datapath).create(tree, name, now_iso(), description, disks)
            if self.quiesce:
                plan.steps[0]["quiesce"] = True    # recover then knows to thaw
            result = self._run(s, datapath, plan, dry_run)
            if not dry_run:
                result["disks"] = self._snapshot_disks(s.tree, name)
            return result

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
        with self._session(domain) as s:
            self._no_interrupted(s)
            datapath = s.datapath = self.datapath_for(s.domain)
            tree = self.load(s, datapath=datapath)
            plan = self._planner(s, datapath).delete(tree, name)
            return self._run(s, datapath, plan, dry_run)

    def revert(self, domain, name, keep_current=None, dry_run=False):
        if keep_current is not None:
            check_snapshot_name(keep_current)
        with self._session(domain) as s:
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
            plan = self._planner(s, datapath).revert(tree, name, now_iso(), keep_current)
            return self._run(s, datapath, plan, dry_run)

    def reclaim(self, domain, dry_run=False):
        """Reclaim hidden nodes that are down to one child (what hooks start after a stop)."""
        with self._session(domain) as s:
            self._no_interrupted(s)
            datapath = s.datapath = self.datapath_for(s.domain)
            tree = self.load(s, datapath=datapath)
            plan = self._planner(s, datapath).reclaim(tree)
            if not plan.steps:
                return dict(plan.result, pause_ms=None)
            return self._run(s, datapath, plan, dry_run)

    def recover(self, domain):
        with self._session(domain) as s:
            op = s.catalog.unfinished()
            datapath = s.datapath = self.datapath_for(s.domain)
            if op is None:
                healed = datapath.heal() if hasattr(datapath, "heal") else []
                return {"domain": s.domain.name, "recovered": None, "unpaused": healed}
            plan = P.Plan.from_dict(op.plan)
            log.info("recovering operation #%d (%s) from step %d of %d", op.id, op.op,
                     op.steps_done, len(plan.steps))
            self._execute(s, datapath, plan, op.id, start=op.steps_done)
            # a crash inside a pause may have left a tapdisk paused although its step is
            # done: nothing stays paused after recover
            healed = datapath.heal() if hasattr(datapath, "heal") else []
            self._sync_metadata(s, s.tree)
            return {"domain": s.domain.name, "recovered": op.id, "op": op.op,
                    "steps_done_before": op.steps_done, "steps": len(plan.steps),
                    "result": plan.result, "unpaused": healed}

    def snapshot_list(self, domain, include_hidden=False):
        with self._session(domain, lock=False) as s:
            tree = self.load(s, validate=False)
            snaps = sorted(tree.snapshots.values(), key=lambda x: (x.created, x.name))
            out = []
            for snap in snaps:
                if snap.state == HIDDEN and not include_hidden:
                    continue
                out.append({"name": snap.name, "state": snap.state,
                            "parent": tree.snapshot_parent(snap.name, include_hidden),
                            "created": snap.created, "description": snap.description,
                            "disks": self._snapshot_disks(tree, snap.name)})
            return {"domain": s.domain.name, "current": tree.current_snapshot(),
                    "snapshots": out}

    def _snapshot_disks(self, tree, name):
        nodes = tree.snapshot_nodes(name)
        return [{"target": d, "image": tree.nodes[nodes[d]].path, "format": tree.nodes[nodes[d]].fmt}
                for d in sorted(nodes)]

    def check(self, domain):
        """Compare the catalog with the images on disk; a list of problems (empty when sound)."""
        with self._session(domain) as s:
            if s.domain.kind == "xen":
                s.datapath = self.datapath_for(s.domain)      # it makes the images readable
            return check.check(self, s)


def _leaf_cost(path):
    """Space a new empty leaf beside ``path`` takes: a file's few KiB (SPACE_MARGIN), or an
    LV of the leaf's full size (LVHD leaves are fully inflated)."""
    from livesnap.tools import lvm
    if lvm.split_path(path) is None:
        return SPACE_MARGIN
    from livesnap.datapaths import vhd_storage
    return vhd_storage.for_path(path).leaf_cost(path)


def _available(directory):
    """(key, bytes free) where new data in ``directory`` goes: its file system, or the free
    space of the volume group when it is an LV directory (``/dev/<vg>``)."""
    from livesnap.tools import lvm
    if lvm.split_path(os.path.join(directory, "x")) is not None:
        from livesnap.datapaths import vhd_storage
        return vhd_storage.for_path(os.path.join(directory, "x")).available(directory)
    st = os.statvfs(directory)
    return os.stat(directory).st_dev, st.f_bavail * st.f_frsize


class _SessionContext(object):
    def __init__(self, engine, ident, lock):
        self.engine = engine
        self.ident = ident
        self.take_lock = lock
        self.lock = None
        self.session = None

    def __enter__(self):
        domain = self.engine.lookup(self.ident)
        state_dir = self.engine.state_dir
        if not os.path.isdir(state_dir):
            os.makedirs(state_dir, 0o700)
        if self.take_lock:
            self.lock = DomainLock(os.path.join(state_dir, domain.uuid + ".lock"), domain.name)
            self.lock.__enter__()
        try:
            catalog = Catalog.for_domain(state_dir, domain.uuid, domain.name)
        except Exception:
            if self.lock:
                self.lock.__exit__(None, None, None)
            raise
        self.session = Session(self.engine, domain, catalog)
        return self.session

    def __exit__(self, *exc):
        try:
            if self.session.datapath is not None:
                self.session.datapath.close()
        finally:
            self.session.catalog.close()
        if self.lock:
            self.lock.__exit__(*exc)
            tree = self.session.tree
            if tree is not None:
                # images merged away by this command, and any a dead process left behind
                # beside this domain's images, are freed after it (datapaths.trash)
                trash.sweep(os.path.dirname(n.path) for n in tree.nodes.values())
            trash.release()
        return False


class _SignalCatcher(object):
    """SIGINT/SIGTERM during execution only record the signal: the running step finishes,
    its effect is journaled, then the engine stops cleanly (or finishes, on the last step)."""

    def __init__(self):
        self.signo = None
        self.old = {}

    def _handler(self, signo, frame):
        self.signo = signo

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self.old = {}
        return self

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)
        return False
