"""The online datapath: a running libvirt domain, its disks qcow2 files open in QEMU.

Never rename or write an image QEMU holds open:

* create is one atomic disk-only snapshot (a drained QMP transaction) onto overlays made
  beforehand, outside the pause;
* a merge inside the live chain is a block job while the guest runs: commit of a non-active
  image, pull (block-stream) into the active image, or active commit with a pivot only when
  the job is ready and the domain XML shows the mirror ready, retried a bounded number of
  times; an active commit that does not converge by its deadline is aborted and the merge
  falls back to a pull;
* images outside the live chain (other branches) are not open in QEMU and are changed with
  qemu-img, as offline.

Each step inspects the live chain and any running job first, so a step re-run after a crash
(of livesnap; QEMU and libvirt keep running the job) finishes what was started.
"""
import logging
import os
import threading

from livesnap.datapaths import Datapath, free, holders, new_overlay, unlink
from livesnap.datapaths.offline import OfflineDatapath
from livesnap import faults
from livesnap.errors import DatapathError, ForeignJob
from livesnap.jobtypes import JOB_ACTIVE_COMMIT, JOB_COMMIT, JOB_PULL, JOB_TYPES
from livesnap.tools import qemu_img

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT = 120.0     # active commit must converge within this
DEFAULT_JOB_TIMEOUT = 3600.0      # any block job must end within this
PIVOT_RETRIES = 10


class LibvirtLiveDatapath(Datapath):
    name = "libvirt-live"
    pauses = True

    def __init__(self, domain, quiesce=False, quiesce_timeout=10.0,
                 ready_timeout=DEFAULT_READY_TIMEOUT, job_timeout=DEFAULT_JOB_TIMEOUT):
        self.domain = domain
        self.offline = OfflineDatapath(domain)
        self.quiesce = quiesce
        self.quiesce_timeout = quiesce_timeout
        self.ready_timeout = float(os.environ.get("LIVESNAP_READY_TIMEOUT", ready_timeout))
        self.job_timeout = job_timeout

    # -- what the planner may choose ------------------------------------------------------

    def merge_ops(self, tree, node_id, child_id):
        """Allowed merge kinds: libvirt streams only into the active image, so a node whose
        child is an intermediate image of the live chain can only be committed."""
        chain = tree.chain(tree.active[tree.nodes[node_id].disk])
        if child_id in chain and child_id != chain[0]:
            return ("commit",)
        return ("commit", "pull")

    # -- create ---------------------------------------------------------------------------

    def do_snapshot(self, step):
        items = step["items"]
        live = {it["disk"]: self.domain.live_chain(it["disk"]) for it in items}
        if all(live[it["disk"]][:2] == [it["leaf_path"], it["frozen_path"]] for it in items):
            if step.get("quiesce"):
                self.heal()                             # a crash may have left it frozen
            self._persist_overlays(items)               # a crash may have come before it
            return {}                                   # done before a crash
        for it in items:
            if live[it["disk"]][0] != it["frozen_path"]:
                raise DatapathError(reason="disk %s of %s is on %s, not on %s: changed outside "
                                           "livesnap" % (it["disk"], self.domain.name,
                                                         live[it["disk"]][0], it["frozen_path"]))
        held = [it for it in items if holders.open_by(it["leaf_path"])]
        if held:
            # the next boot on what QEMU writes to, not on the frozen image: a restart
            # before recover must not lose the writes since the switch
            self._persist_overlays(held)
            self._refuse_held(held[0])
        for it in items:
            # a leftover of an attempt is unused: replaced; a new file 0600, never through
            # a link, or a new LV
            new_overlay(it["leaf_path"], it["frozen_path"], it["frozen_fmt"])
        targets = {it["disk"] for it in items}
        others = [d.target for d in self.domain.disks() if d.target not in targets]
        faults.point("snapshot", "overlays", 0)
        frozen = self._freeze() if (self.quiesce or step.get("quiesce")) else None
        try:
            pause_ms = self.domain.snapshot_disks(
                [(it["disk"], it["leaf_path"], it["fmt"]) for it in items], others)
        finally:
            if frozen is not None:
                self._thaw(frozen)
        faults.point("snapshot", "switched", 0)
        self._persist_overlays(items)
        # not a measured pause: the API call's duration, an upper bound of it
        return {"pause_ms": pause_ms, "measured": "call"}

    def _persist_overlays(self, items):
        """Make the next-boot definition name the new overlays. libvirt changes it with the
        switch, but a libvirtd reload (SIGHUP, 'systemctl reload libvirtd') that overlaps the
        snapshot call puts back the definition it read from its file before the switch
        (libvirt 9.0: seen in about one snapshot in twenty under a reload every 0.5 s), which
        names the images now frozen: the domain would boot next on them, without every write
        since, and write into a snapshot's image. A disk whose definition names the frozen
        image is pointed at its overlay (one defineXML); a disk defined on another image (its
        next boot changed on purpose) is left alone, as libvirt leaves it. Returns the
        targets redefined."""
        persistent = {d.target: d.path for d in self.domain.disks(inactive=True)}
        stale = {it["disk"]: (it["leaf_path"], it["fmt"]) for it in items
                 if persistent.get(it["disk"]) == it["frozen_path"]
                 and it["frozen_path"] != it["leaf_path"]}
        if stale:
            log.warning("the persistent definition of %s still named the snapshot's images "
                        "after the switch (a libvirtd reload meanwhile?): %s redefined on %s",
                        self.domain.name, ", ".join(sorted(stale)),
                        ", ".join(stale[t][0] for t in sorted(stale)))
            self.domain.set_disk_sources(stale)
        return sorted(stale)

    def _freeze(self):
        """Freeze guest file systems through the agent; a timer thaws them after
        ``quiesce_timeout`` seconds whatever happens to the snapshot call."""
        self.domain.fs_freeze()
        timer = threading.Timer(self.quiesce_timeout, self._thaw_quietly)
        timer.daemon = True
        timer.start()
        faults.point("quiesce", "frozen", 0)
        return timer

    def heal(self):
        """Thaw the guest's file systems if a crashed command left them frozen (a thaw of
        thawed file systems does nothing); nothing else of this datapath stays paused."""
        if self.domain.has_guest_agent():
            try:
                if self.domain.fs_thaw():
                    log.warning("thawed the file systems of %s", self.domain.name)
                    return ["fs-thaw"]
            except Exception as e:   # no agent answering: nothing was frozen by us
                log.info("no thaw of %s: %s", self.domain.name, e)
        return []

    def _thaw_quietly(self):
        try:
            self.domain.fs_thaw()
        except Exception as e:   # logged; the caller's own thaw reports errors
            log.error("timed thaw failed: %s", e)

    def _thaw(self, timer):
        timer.cancel()
        self.domain.fs_thaw()

    def _refuse_held(self, it):
        """An overlay libvirt does not show in the disk's chain, yet open in a process: QEMU
        switched to it (its writes since are there), but libvirt's state of the domain is
        stale (a libvirtd restarted in the middle of the snapshot reloads what it saved
        before the switch). Neither removed, nor re-created, nor the snapshot rolled back:
        DatapathError (``do_snapshot`` first points the next boot at the held overlays). Once the domain is shut down, recover finds the overlay holding the
        writes and makes it the disk's image (the offline datapath)."""
        pids = holders.open_by(it["leaf_path"])
        if pids:
            raise DatapathError(reason="%s is open in process %s, although libvirt names %s as "
                                       "the image of %s/%s: QEMU switched to it and libvirt's "
                                       "state is stale (libvirtd restarted during the "
                                       "snapshot?); not removed, its next boot set to it. "
                                       "Shut the domain down, then run 'livesnap recover %s'"
                                % (it["leaf_path"], ",".join(str(p) for p in pids),
                                   it["frozen_path"], self.domain.name, it["disk"],
                                   self.domain.name))

    def abandon(self, step):
        live = set()
        for it in step.get("items", []):
            live.update(self.domain.live_chain(it["disk"]))
        for it in step.get("items", []):
            if it["leaf_path"] not in live:
                self._refuse_held(it)
        for it in step.get("items", []):
            if it["leaf_path"] not in live:
                unlink(it["leaf_path"], made_here=True)

    # -- delete -----------------------------------------------------------------------------

    def do_remove(self, step):
        if step["path"] in self.domain.live_chain(step["disk"]):
            raise DatapathError(reason="%s is in the running chain of %s/%s: not removed"
                                % (step["path"], self.domain.name, step["disk"]))
        free(step["path"])

    def do_commit(self, step):
        disk, node, child = step["disk"], step["path"], step["child_path"]
        chain = self.domain.live_chain(disk)
        if node not in chain and child not in chain:
            return self.offline.do_commit(dict(step, child_active=False))
        facts = {}
        if child in chain and node in chain:
            with self.domain.watch_jobs() as watcher:
                if child == chain[0]:
                    facts = self._active_commit(watcher, step)
                else:
                    self._run_job(watcher, disk, lambda: self.domain.block_commit(
                        disk, child, node, active=False),
                        done=lambda: child not in self.domain.live_chain(disk),
                        job_type=JOB_COMMIT)
            chain = self.domain.live_chain(disk)
        if child in chain and node not in chain:
            # the active commit fell back to a pull (now or before a crash)
            facts["replace_step"] = dict(step, op="pull")
            free(node)
            return facts
        if child in chain:
            raise DatapathError(reason="commit of %s into %s did not take effect on %s/%s"
                                % (child, node, self.domain.name, disk))
        for g in step["grandchildren"]:
            if g["path"] not in chain and qemu_img.backing_path(
                    qemu_img.info(g["path"], force_share=True), g["path"]) != node:
                qemu_img.rebase(g["path"], node, step["fmt"], unsafe=True)
        if step["child_active"]:
            self._persist_source(disk, node, step["fmt"])
        free(child)
        return facts

    def _active_commit(self, watcher, step):
        """Active commit, pivot when ready; if it does not converge in time, abort it and
        pull instead. Returns the facts of the switch."""
        disk, node, child = step["disk"], step["path"], step["child_path"]
        info = self.domain.job_info(disk)
        if info and info.get("type") not in (JOB_ACTIVE_COMMIT, JOB_PULL):
            self._foreign(disk, info)
        if info.get("type") == JOB_ACTIVE_COMMIT:
            self._check_ours(disk, node)
        if not info:
            try:
                self.domain.block_commit(disk, child, node, active=True)
            except DatapathError:
                if child not in self.domain.live_chain(disk):
                    return {}                     # pivoted before this run (recover)
                raise
            faults.point("job", "started", 0)
        elif info.get("type") == JOB_PULL:               # a pull started by a fallback
            self._wait_done(watcher, disk, JOB_PULL)
            return {}
        for attempt in range(PIVOT_RETRIES):
            # a deadline of 0 (LIVESNAP_READY_TIMEOUT=0): no time to converge, whatever the
            # job says at once (a tiny commit may be ready before the first look)
            status = None if self.ready_timeout <= 0 else watcher.wait(
                disk, (watcher.READY, watcher.FAILED, watcher.CANCELED), self.ready_timeout,
                job_types=(JOB_ACTIVE_COMMIT,))
            if status is None:
                log.warning("active commit of %s/%s not ready after %.0fs under load: "
                            "aborting it and pulling instead", self.domain.name, disk,
                            self.ready_timeout)
                self._check_ours(disk, node)
                self.domain.abort_job(disk)
                watcher.wait(disk, (watcher.CANCELED, watcher.COMPLETED), 30)
                watcher.clear(disk)
                self._run_job(watcher, disk, lambda: self.domain.block_pull(
                    disk, step["parent_path"]),
                    done=lambda: node not in self.domain.live_chain(disk), job_type=JOB_PULL)
                return {"fallback": "pull"}
            if status != watcher.READY:
                raise DatapathError(reason="active commit of %s/%s ended: %s"
                                    % (self.domain.name, disk, watcher.NAMES[status]))
            info = self._check_ours(disk, node)
            if info.get("cur") == info.get("end") and self.domain.mirror_ready(disk):
                pause_ms = self.domain.pivot(disk)
                if pause_ms is not None:
                    watcher.wait(disk, (watcher.COMPLETED,), 30)
                    return {"pause_ms": pause_ms, "measured": "call"}
            watcher.clear(disk)                          # not ready after all: wait again
        raise DatapathError(reason="active commit of %s/%s never became ready to pivot after "
                                   "%d tries" % (self.domain.name, disk, PIVOT_RETRIES))

    def _foreign(self, disk, info):
        _, dest = self.domain.mirror(disk)
        raise ForeignJob(self.domain.name, disk, JOB_TYPES.get(info.get("type"), "block"), dest)

    def _check_ours(self, disk, node):
        """The job on ``disk`` is livesnap's active commit into ``node`` (not a copy or a
        commit someone else started meanwhile): only then may it be pivoted or aborted.
        Returns its job info."""
        info = self.domain.job_info(disk)
        job, dest = self.domain.mirror(disk)
        if info.get("type") != JOB_ACTIVE_COMMIT or (dest is not None and dest != node):
            raise ForeignJob(self.domain.name, disk,
                             JOB_TYPES.get(info.get("type"), "block") if info else "vanished",
                             dest)
        return info

    def _run_job(self, watcher, disk, start, done, job_type):
        """Start a job unless one runs, and wait for it. A job that finished while livesnap
        was down (recover) may still show in the chain for a moment: when libvirt refuses
        the new job because the image left the chain, ``done()`` says the merge happened.
        A running job of another type than ``job_type`` is not livesnap's: refused."""
        info = self.domain.job_info(disk)
        if info and info.get("type") != job_type:
            self._foreign(disk, info)
        if not info:
            try:
                start()
            except DatapathError:
                if done():
                    log.info("the merge on %s/%s finished before this run", self.domain.name,
                             disk)
                    return
                raise
            faults.point("job", "started", 0)
        self._wait_done(watcher, disk, job_type)

    def _wait_done(self, watcher, disk, job_type):
        status = watcher.wait(disk, (watcher.COMPLETED, watcher.FAILED, watcher.CANCELED),
                              self.job_timeout, job_types=(job_type,))
        if status != watcher.COMPLETED:
            raise DatapathError(reason="block job on %s/%s %s" % (
                self.domain.name, disk, "timed out" if status is None
                else watcher.NAMES[status]))

    def do_pull(self, step):
        disk, node, child = step["disk"], step["path"], step["child_path"]
        chain = self.domain.live_chain(disk)
        if child not in chain:
            return self.offline.do_pull(step)
        if node in chain:
            if child != chain[0]:
                raise DatapathError(reason="cannot pull into %s: not the active image of "
                                           "%s/%s" % (child, self.domain.name, disk))
            with self.domain.watch_jobs() as watcher:
                self._run_job(watcher, disk, lambda: self.domain.block_pull(
                    disk, step["parent_path"]),
                    done=lambda: node not in self.domain.live_chain(disk), job_type=JOB_PULL)
            chain = self.domain.live_chain(disk)
            if node in chain:
                raise DatapathError(reason="pull of %s into %s did not take effect"
                                    % (node, child))
        free(node)
        return {}

    def _persist_source(self, disk, path, fmt):
        """libvirt normally updates the persistent definition after a pivot; make sure."""
        current = {d.target: d.path for d in self.domain.disks(inactive=True)}
        if current.get(disk) != path:
            self.domain.set_disk_sources({disk: (path, fmt)})

    def do_new_leaf(self, step):
        raise DatapathError(reason="revert needs %s shut off" % self.domain.name)
