"""VHD datapaths, tapdisk's way: the disk's leaf keeps its path, frozen images are renamed.

``VhdOfflineDatapath``: no tapdisk serves the disks (domain shut off); images are changed
with the VHD engine directly.

``TapdiskDatapath``: a tapdisk serves each disk. It holds the whole chain open (the leaf
read-write, with a stale footer on disk; the parents read-only, their metadata cached), so:

* a snapshot pauses every selected tapdisk, renames each leaf to the snapshot's name,
  creates the new empty leaf at the old path and unpauses with ``-a`` on that path; the
  pause window is measured;
* data is copied only between read-only images while tapdisk runs: coalesce into a parent
  whose only child is the source (tapdisk reads those sectors from the child anyway), or pull
  into a child (it writes exactly the bytes tapdisk would read from below);
* a merge that involves the active leaf first takes an internal snapshot (planned by the
  planner), so the pause covers only the rename and, later, the reparenting.

Changed-block tracking (a platform with ``cbt_log_path``: XAPI): every unpause names the
leaf's CBT log, a snapshot gives the snapshot's VDI the leaf's log and the leaf a new one, a
removed image's log is merged into the next, as SM does (livesnap.datapaths.cbt_logs).

Every step checks what is already done, so it can be re-run after a crash; ``heal`` unpauses
any tapdisk of the domain left paused.
"""
import contextlib
import logging
import os
import re
import time
import uuid

from livesnap import vhd
from livesnap.datapaths import Datapath, Namer, cbt_logs, fold_resume
from livesnap.datapaths.vhd_storage import Activation, for_path as storage, merge_extra
from livesnap import faults
from livesnap.errors import DatapathError
from livesnap.tools import lvm, tap_ctl

log = logging.getLogger(__name__)

LV_UNSAFE = re.compile(r"[^A-Za-z0-9+_.-]")
LV_NAME_MAX = 127


def _parent(path):
    """The parent ``path``'s header names, read without its BAT: ``path`` may be the leaf a
    tapdisk holds open read-write, whose BAT and footer move while it allocates blocks (a
    full open could read a BAT entry past the footer it read, or act on stale metadata);
    tapdisk never rewrites the header and its locators."""
    parent = vhd.parent_of(path)
    return os.path.abspath(parent) if parent else None


def _is_child(path, parent):
    """``path`` exists and is a VHD whose parent is ``parent`` (False for a half-made one)."""
    return os.path.exists(path) and fold_resume.parent_or_none(path) == parent


class TapdiskNamer(Namer):
    """The leaf keeps the VM's path; a frozen image gets a new name beside it:

    * ``style="name"``: a file ``<dir>/<stem>.<name>.vhd``, an LV ``<vg>/<lv>.<name>``
      (characters LVM does not allow in a name become ``_``; a name too long for LVM's 127
      characters is cut);
    * ``style="uuid"`` (a XAPI storage repository): a new VDI uuid, ``<dir>/<uuid>.vhd`` or
      ``<vg>/VHD-<uuid>``, the names SM's scan knows as VDIs.
    """

    def __init__(self, style="name"):
        super(TapdiskNamer, self).__init__()
        self.style = style

    def _free(self, tree, leaf_path, token):
        directory, base = os.path.split(leaf_path)
        is_lv = lvm.split_path(leaf_path) is not None
        if self.style == "uuid":
            while True:
                u = str(uuid.uuid4())
                p = os.path.join(directory, ("VHD-%s" % u) if is_lv else ("%s.vhd" % u))
                if p not in self.handed_out and not os.path.exists(p):
                    self.handed_out.add(p)
                    return p
        if is_lv:
            token = LV_UNSAFE.sub("_", token)
            stem = ("%s.%s" % (base, token))[:LV_NAME_MAX - 4]
            return self.free_path(tree, os.path.join(directory, stem), "")
        stem = base[:-4] if base.endswith(".vhd") else base
        return self.free_path(tree, os.path.join(directory, "%s.%s" % (stem, token)), ".vhd")

    def __call__(self, tree, disk, purpose, name, keep=None):
        leaf = tree.nodes[tree.active[disk]]
        if purpose == "revert":
            return {"leaf": leaf.path,
                    "kept": self._free(tree, leaf.path, keep) if keep else None}
        token = name if purpose == "snapshot" else "internal-%s" % os.urandom(4).hex()
        out = {"frozen": self._free(tree, leaf.path, token), "leaf": leaf.path}
        if purpose == "snapshot" and self.style == "uuid":
            out["face"] = self._free(tree, leaf.path, token)     # SM's layout: the snapshot VDI
        return out


class VhdOfflineDatapath(Datapath):
    name = "vhd-offline"

    def __init__(self, domain):
        self.domain = domain
        self.made = set()                 # image paths this command renamed to or created
        self.activation = None
        lv_leaves = [d.path for d in domain.disks()
                     if domain.snapshottable(d) and lvm.split_path(d.path) is not None]
        if self.manages_activation and lv_leaves:
            self.activation = Activation()
            for leaf in lv_leaves:
                self.activation.begin(leaf)

    # LVs of a stopped VM may be inactive (SM activates a chain while the VDI is attached);
    # with tapdisk running its chain is active, a snapshot's own image (SM leaves it
    # inactive) may not be.
    manages_activation = True
    # bytes a merge writes between two pushes to the disk (None: the VHD engine's own)
    writeback_step = None

    def prepare(self, tree):
        """Before the tree's images are read: every LV among them active."""
        if self.activation is not None:
            self.activation.need(n.path for n in tree.nodes.values())

    def close(self):
        """Put LV activation back as it was (what a detached VM's command made goes
        inactive; on SM's SRs what SM counts nobody needing, as SM leaves it)."""
        if self.activation is not None:
            current, held = set(self.made), set()
            for d in self.domain.disks():
                if self.domain.snapshottable(d) and os.path.exists(d.path):
                    try:
                        chain = vhd.chain_paths(d.path)
                    except vhd.VhdError:
                        chain = [d.path]
                    current.update(chain)
                    if d.path not in self.activation.activated:   # active before: a tapdisk's
                        held.update(chain)                        # or its user's
            self.activation.end(current, held)

    def run(self, step):
        """Every step under the platform's chain lock where it has one (SM's SR lock on a
        XAPI host, so its garbage collector never sees a chain half changed)."""
        lock = getattr(self.domain, "chain_lock", None)
        with (lock() if lock is not None else _nothing()):
            return super(VhdOfflineDatapath, self).run(step)

    def merge_ops(self, tree, node_id, child_id):
        """The disk keeps its path: a merge with the active leaf pulls into it (a commit
        would move the disk's data into the parent's file)."""
        if tree.nodes[child_id].state == "active":
            return ("pull",)
        return ("commit", "pull")

    # What tapdisk would need paused around a change of these images; nothing offline.
    @contextlib.contextmanager
    def _paused(self, disks):
        yield None

    def _leaf_path(self, disk):
        for d in self.domain.disks():
            if d.target == disk:
                return d.path
        raise DatapathError(reason="domain %s has no disk %s" % (self.domain.name, disk))

    def _is_leaf(self, path):
        return os.path.normpath(path) in {os.path.normpath(d.path) for d in self.domain.disks()
                                          if d.path}

    def _freeze(self, items, hidden=False):
        """Rename each leaf away and put a new empty leaf at its path (idempotent). Inside
        the pause, per disk: rename, (LV: deflate the renamed image), hidden flag for an
        internal image, the new leaf, both names durable (one directory fsync for the two);
        after it the frozen images become read-only (LV)."""
        todo = []
        for it in items:
            frozen, leaf = it["frozen_path"], it["leaf_path"]
            self.made.update((frozen, leaf))
            if storage(frozen).exists(frozen) and _is_child(leaf, frozen):
                continue                                    # done before a crash
            todo.append(it)
        rotations = self._cbt_rotations(items)
        pause_ms = None
        if todo or [r for r, _ in rotations if not r.done()]:
            with self._paused([it["disk"] for it in todo] +
                              [d for r, d in rotations if not r.done()]) as window:
                for r, _ in rotations:
                    r.in_pause()
                for it in todo:
                    frozen, leaf = it["frozen_path"], it["leaf_path"]
                    st = storage(leaf)
                    if st.exists(leaf) and not st.exists(frozen):
                        st.rename(leaf, frozen, sync=False)
                        faults.point("tapdisk", "renamed", 0)
                    st.freeze(frozen, readonly=False)
                    if hidden or it.get("face_path"):
                        vhd.set_hidden(frozen, 1)
                    st.create_child(leaf, frozen, leaf=True, sync=False)
                    st.sync([frozen, leaf])       # before tapdisk writes into the new leaf
            pause_ms = getattr(window, "ms", None)
        for r, _ in rotations:
            r.finish()
        for it in items:
            if it.get("face_path"):
                self._face(it["face_path"], it["frozen_path"])
        for it in items:
            storage(it["frozen_path"]).set_readonly(it["frozen_path"])
            storage(it["frozen_path"]).frozen_from(it["frozen_path"], it["leaf_path"])
        return {"pause_ms": pause_ms}

    # -- changed-block tracking (livesnap.datapaths.cbt_logs) ---------------------------------

    def _cbt_log_path(self, path):
        """Where the platform keeps the CBT log of the VDI whose image is ``path`` (None: no
        CBT on this platform or storage)."""
        where = getattr(self.domain, "cbt_log_path", None)
        return where(path) if where is not None else None

    def _cbt_log(self, path):
        """The CBT log of ``path``'s VDI when it exists (SM: tracking is on while it does)."""
        p = self._cbt_log_path(path)
        return p if p is not None and cbt_logs.store(p).exists(p) else None

    def _cbt_rotations(self, items):
        """[(Rotation, disk)] for the snapshot items whose leaf has a CBT log (or is in the
        middle of a rotation), each prepared (its new log made) before the pause."""
        out = []
        for it in items:
            leaf_log = self._cbt_log_path(it["leaf_path"])
            snap_log = self._cbt_log_path(it["face_path"]) if it.get("face_path") else None
            if leaf_log is None or snap_log is None:
                continue
            r = cbt_logs.Rotation(leaf_log, snap_log)
            if not r.wanted():
                continue
            if not r.done():
                with vhd.open_header(it["leaf_path"]) as img:      # footer only: may be open
                    size = img.virtual_size
                r.prepare(size, open_by_tapdisk=self.pauses)
            out.append((r, it["disk"]))
        return out

    def _cbt_drop(self, disk, path):
        """A removed image's CBT log merged into the next log and removed (SM's delete);
        ``{"pause_ms": ...}`` of the running leaf's pause for it, or {}."""
        log_path = self._cbt_log(path)
        if log_path is None:
            return {}
        leaf_log = self._cbt_log_path(self._leaf_path(disk))
        facts = {}

        @contextlib.contextmanager
        def pause_for(child):
            if child == leaf_log and self.pauses:
                with self._paused([disk]) as window:
                    yield
                facts["pause_ms"] = window.ms
                return
            cbt_logs.refuse_open_child(child, leaf_log)
            yield
        cbt_logs.drop(log_path, pause_for)
        return facts

    def empty(self, tree, node_id):
        """The node's image holds no data blocks (a snapshot's face as made)."""
        path = tree.nodes[node_id].path
        if self._is_leaf(path):
            return False
        with vhd.open_image(path, chain=False) as img:
            return not img.allocated_blocks()

    def _face(self, face, base):
        """SM's layout: the snapshot's own image, an empty leaf on its base copy (no tapdisk
        has it open: made outside the pause)."""
        self.made.add(face)
        if not _is_child(face, base):
            storage(face).create_child(face, base, leaf=False)

    def do_clone(self, step):
        """Freeze a snapshot's leaf (SM's layout) as a hidden base copy under a new empty
        leaf at its path, as SM's VDI.clone does; no tapdisk has it open."""
        face, frozen = step["face_path"], step["frozen_path"]
        self.made.update((face, frozen))
        st = storage(face)
        if not (st.exists(frozen) and _is_child(face, frozen)):
            if st.exists(face) and not st.exists(frozen):
                st.rename(face, frozen)
            with st.writable(frozen):           # a snapshot's leaf may be read-only
                vhd.set_hidden(frozen, 1)
            st.create_child(face, frozen, leaf=False)
        st.set_readonly(frozen)
        st.frozen_from(frozen, face)

    def do_fold(self, step):
        """Offline (or into a leaf no tapdisk has open): the leaf takes the node's data by a
        pull and keeps its path. What a tapdisk's fold left half done (the host went down
        in it) is finished first: a round's freeze and commit of the spare image, the last
        pause's rename of the node over the leaf."""
        fold_resume.settle(self, step)
        return self.do_pull(step)

    def do_snapshot(self, step):
        return self._freeze(step["items"])

    def do_internal_snapshot(self, step):
        return self._freeze([step], hidden=True)

    def do_hide(self, step):
        path = step["path"]
        with storage(path).writable(path):
            vhd.set_hidden(path, 1)

    def do_remove(self, step):
        storage(step["path"]).remove(step["path"])
        faults.point("remove", "unlinked", 0)      # the image gone, its CBT log not yet
        return self._cbt_drop(step["disk"], step["path"])

    def _reparent(self, disk, paths, new_parent, in_chain):
        """Point ``paths`` at ``new_parent``. When one of them is in the chain a tapdisk
        holds open, that tapdisk is paused for just the header writes (its leaf's metadata is
        valid on disk only while it is paused, and it reopens the new chain on unpause); LVs
        are made writable before the pause and read-only again after it."""
        todo = [p for p in paths if _parent(p) != new_parent]
        with contextlib.ExitStack() as stack:
            for p in todo:
                stack.enter_context(storage(p).writable(p, leaf=self._is_leaf(p)))
            if in_chain and self.pauses and todo:
                with self._paused([disk]) as window:
                    for p in todo:
                        vhd.set_parent(p, new_parent)
                return window.ms
            for p in todo:
                vhd.set_parent(p, new_parent)
        return None

    def do_commit(self, step):
        node, child = step["path"], step["child_path"]
        if os.path.exists(child) and _parent(child) == node:
            with storage(node).writable(node, extra=merge_extra(child)):
                vhd.coalesce(child, writeback_step=self.writeback_step)
                # node's file now stands for child: it takes child's hidden flag (SM's GC
                # merges a hidden image with one child on its own; an internal image stays
                # hidden, a named snapshot must not be)
                hidden = vhd.query(child).hidden
                if vhd.query(node).hidden != hidden:
                    vhd.set_hidden(node, hidden)
        grand = [g["path"] for g in step["grandchildren"]]
        pause_ms = self._reparent(step["disk"], grand, node, step.get("child_in_chain"))
        faults.point("merge", "reparented", 0)
        self._discard(child)
        return {"pause_ms": pause_ms}

    def do_pull(self, step):
        node, child = step["path"], step["child_path"]
        if os.path.exists(node) and _parent(child) == node:
            with storage(child).writable(child, extra=merge_extra(node),
                                         leaf=self._is_leaf(child)):
                vhd.pull(child, writeback_step=self.writeback_step)
        pause_ms = self._reparent(step["disk"], [child], step["parent_path"],
                                  step.get("child_in_chain"))
        self._discard(node)
        return {"pause_ms": pause_ms}

    def _discard(self, path):
        """An image merged away."""
        storage(path).remove(path)

    def do_new_leaf(self, step):
        leaf = step["leaf_path"]
        self.made.add(leaf)
        if _is_child(leaf, step["parent_path"]):
            return
        storage(leaf).create_child(leaf, step["parent_path"], leaf=True)

    def do_keep_leaf(self, step):
        old, kept = step["path"], step.get("kept_path")
        if kept:
            self.made.add(kept)
        if kept and os.path.exists(old) and not os.path.exists(kept):
            storage(old).rename(old, kept)
        if kept and os.path.exists(kept):
            storage(kept).freeze(kept)
        leaf_log, kept_log = self._cbt_log_path(old), kept and self._cbt_log_path(kept)
        if leaf_log is not None and kept_log:
            cbt_logs.keep(leaf_log, kept_log)       # XAPI: VM.snapshot, then VM.revert

    def abandon(self, step):
        """A snapshot that failed before its pause took effect: the leaf's next CBT log, made
        before the pause, is removed (the leaf keeps its log)."""
        for it in step.get("items", []) if step["op"] == "snapshot" else []:
            leaf_log = self._cbt_log_path(it["leaf_path"])
            snap_log = self._cbt_log_path(it["face_path"]) if it.get("face_path") else None
            if leaf_log is not None and snap_log is not None:
                cbt_logs.Rotation(leaf_log, snap_log).abandon()
        return None

    def heal(self):
        return []


class TapdiskDatapath(VhdOfflineDatapath):
    name = "tapdisk"
    pauses = True
    # a merge beside the running guest (a fold's rounds) pushes its data every 8 MiB: the
    # guest's writes queue behind each push (bench/xen_sm.py, a fold of 512 MiB: the guest's
    # longest gap between the fold's pauses 23-44 ms with the engine's 32 MiB, 19-32 ms)
    writeback_step = 8 << 20

    def __init__(self, domain, pause_timeout=tap_ctl.DEFAULT_PAUSE_TIMEOUT):
        super(TapdiskDatapath, self).__init__(domain)
        self.pause_timeout = pause_timeout

    def needs_internal(self, tree, child_id):
        return tree.nodes[child_id].state == "active"

    def _tapdisk(self, disk):
        path = self._leaf_path(disk)
        td = tap_ctl.find(path)
        if td is None:
            raise DatapathError(reason="no tapdisk serves disk %s (%s) of %s"
                                % (disk, path, self.domain.name))
        # reopened under the name it was opened by (SM finds its tapdisks by that string)
        return td, td.path or path

    @contextlib.contextmanager
    def _paused(self, disks):
        """Pause the tapdisks of ``disks`` together; unpause each with -a on its leaf path
        whatever happens, and with -c on its leaf's CBT log when it has one then (SM's
        tapdisk-pause; a snapshot inside the pause may have just put a new one in place).
        Yields an object whose ``ms`` is the whole window, from the first pause to the last
        unpause (the unpause reopens the chain: part of the pause)."""
        disks = sorted(set(disks))
        targets = [self._tapdisk(disk) for disk in disks]
        window = _Window()
        guard = getattr(self.domain, "pause_guard", None)       # XAPI: SM's pause protocol
        with contextlib.ExitStack() as stack:
            if guard is not None:
                stack.enter_context(guard(sorted(set(disks))))
            t0 = time.monotonic()
            stack.callback(window.stop, t0)          # runs last, after every unpause
            logs = []
            for disk, (td, path) in zip(disks, targets):
                cbt = self._cbt_log_path(self._leaf_path(disk))
                w = stack.enter_context(tap_ctl.paused(
                    td.pid, td.minor, path=path, timeout=self.pause_timeout,
                    cbtlog=cbt if cbt is not None and os.path.exists(cbt) else None))
                logs.append((w, cbt))
            stack.callback(_name_cbt_logs, logs)         # runs first: before the unpauses
            yield window

    def do_remove(self, step):
        if self._is_leaf(step["path"]):
            raise DatapathError(reason="%s is served by a tapdisk: not removed" % step["path"])
        storage(step["path"]).remove(step["path"])
        return self._cbt_drop(step["disk"], step["path"])

    def _discard(self, path):
        """An image merged away while the domain runs: a large file on a file system that
        discards on free is freed after the command (the guest's flushes would wait behind
        its discards; bench/xen_sm.py saw a 225 ms gap in a fold of 512 MiB)."""
        storage(path).release(path)

    # fold with the running leaf: rounds until the leaf holds little, then one last pause
    FOLD_ROUNDS = 5
    FOLD_SMALL = 4 << 20

    def do_fold(self, step):
        """Merge the hidden node into the running leaf below it, with pauses of
        milliseconds, leaving one image at the leaf's path (SM's leaf-coalesce, without its
        pause of the whole copy). Each round freezes the leaf into ``spare_path`` (a pause),
        coalesces that into the node while tapdisk runs (the node's only child is the frozen
        image, read-only: tapdisk reads those sectors from it anyway), and points the leaf at
        the node (a pause); when the leaf holds at most ``FOLD_SMALL`` bytes, or no less
        than before the round (the guest keeps rewriting the same blocks), or after
        ``FOLD_ROUNDS`` rounds, one last pause coalesces the leaf's few blocks into the node
        and renames the node over the leaf, and tapdisk reopens its path. Every part checks
        what is already done (re-run after a crash)."""
        leaf = step["child_path"]
        if not self._is_leaf(leaf):
            return super(TapdiskDatapath, self).do_fold(step)
        node, spare, disk = step["path"], step["spare_path"], step["disk"]
        st = storage(leaf)
        if not st.exists(node):
            if st.exists(leaf) and fold_resume.parent_or_none(leaf) == step["parent_path"]:
                return {"pause_ms": None, "rounds": 0}          # done before a crash
            raise DatapathError(reason="cannot fold %s into %s: %s is gone"
                                % (node, leaf, node))
        pauses = []
        rounds = 0
        last = None
        freeze = [{"disk": disk, "frozen_path": spare, "leaf_path": leaf}]
        while True:
            if not st.exists(leaf) and st.exists(spare):
                # a round's freeze cut short after its rename: finish it
                pauses.append(self._freeze(freeze, hidden=True)["pause_ms"])
            if not st.exists(leaf):
                break                      # the last pause cut short after the LV's removal
            parent = fold_resume.parent_or_none(leaf)
            if parent == spare and st.exists(spare):
                pass                                   # a round cut short: finish it
            elif parent != node:
                raise DatapathError(reason="cannot fold %s into %s: its parent is %s"
                                    % (node, leaf, parent))
            else:
                if st.exists(spare):
                    st.remove(spare)           # a round's spare merged, left by a crash
                held = vhd.data_unchecked(leaf)
                # done when the leaf holds little, or no less than after the last round (the
                # guest rewrites the same blocks: another round would not shrink the last
                # pause), or after FOLD_ROUNDS rounds
                if held <= self.FOLD_SMALL or rounds >= self.FOLD_ROUNDS or \
                        (last is not None and held >= last):
                    break
                last = held
                pauses.append(self._freeze(freeze, hidden=True)["pause_ms"])
            r = self.do_commit({"path": node, "child_path": spare, "disk": disk,
                                "grandchildren": [{"path": leaf}], "child_in_chain": True})
            pauses.append(r["pause_ms"])
            rounds += 1
        pauses.append(self._fold_last(disk, node, leaf))
        pauses = [ms for ms in pauses if ms is not None]
        return {"pause_ms": max(pauses) if pauses else None, "pauses_ms": pauses,
                "rounds": rounds}

    def _fold_last(self, disk, node, leaf):
        """One pause: the leaf's blocks into the node, the node visible and renamed over the
        leaf (an LV: made writable at its full size first, as a leaf always is)."""
        st = storage(leaf)
        st.make_leaf(node)
        with st.counts_locked(node, leaf):         # SM's refcount locks: not waited for in
            with self._paused([disk]) as window:   # the pause
                if st.exists(leaf) and fold_resume.parent_or_none(leaf) == node:
                    vhd.coalesce(leaf)
                if vhd.query(node).hidden:
                    vhd.set_hidden(node, 0)
                faults.point("tapdisk", "folded", 0)
                st.replace(node, leaf)
        return window.ms

    def do_new_leaf(self, step):
        raise DatapathError(reason="revert needs %s shut off (its tapdisks closed)"
                            % self.domain.name)

    def heal(self):
        """Unpause every tapdisk of the domain that is left paused (after a crash)."""
        healed = []
        for d in self.domain.disks():
            if not self.domain.snapshottable(d):
                continue
            td = tap_ctl.find(d.path)
            if td is not None and td.state is not None and td.state & tap_ctl.PAUSED \
                    and os.path.exists(d.path):
                cbt = self._cbt_log_path(d.path)
                if cbt is not None:
                    cbt_logs.finish_pending(cbt)
                    if cbt_logs.store(cbt).exists(cbt):
                        cbt_logs.store(cbt).make(cbt)     # an inactive LV: activated
                tap_ctl.unpause(td.pid, td.minor, td.path or d.path,
                                cbtlog=cbt if cbt is not None and os.path.exists(cbt) else None)
                healed.append(d.target)
        return healed


def _name_cbt_logs(logs):
    """Each unpause names its leaf's CBT log if the log exists now."""
    for w, cbt in logs:
        w.cbtlog = cbt if cbt is not None and os.path.exists(cbt) else None


@contextlib.contextmanager
def _nothing():
    yield None


class _Window(object):
    ms = None

    def stop(self, t0):
        self.ms = (time.monotonic() - t0) * 1000.0
