"""The tapdisk datapath for a VM whose tapdisks run on another host of a XAPI pool, its
disks on a shared LVHD SR, livesnap on the SR master (issue 13). Each pause is the
platform's (``domain.pool_pause()``: SM's tapdisk-pause and on-slave plugins through XAPI,
livesnap/platforms/xapi_pool.py); what the other host must do to its LV views follows from
the chains, as SM's own LVHD snapshot and leaf-coalesce decide it:

* right after the pause, before the chain changes: the leaf's LV deactivated there
  (``deactivateNoRefcount``: LVHDSR ``_updateSlavesPreClone``, cleanup's
  ``_updateSlavesOnRename``);
* right before the unpause: the leaf's LV refreshed (``refresh``: whatever LV has its name
  now), each LV new in the chain activated with that host's refcount (``activate``:
  ``_updateSlavesOnClone``), each LV that left the chain deactivated with its count taken
  back (``deactivate``) or, gone from the VG, its device, lock and counts dropped
  (``deactivateNoRefcount``, ``cleanupLockAndRefcount``: ``_checkSlaves``,
  ``_updateSlavesOnRename``), and each LV of the chain whose size changed since the command
  began (the master inflated or deflated it: the other host's device map is stale)
  refreshed (``lvRefreshOnSlaves`` after a resize);
* a crash inside a pause: the chain as the pause began is kept in livesnap's mark on the
  VDI (``sm_config``), so ``recover`` (re-running the step, or ``heal``) brings the other
  hosts' views from it to the chain it leaves, then unpauses.

The master's own LV activation is managed as for a VM not running here: what the command
activates for itself is deactivated afterwards (vhd_storage.Activation)."""
import contextlib
import time

from livesnap import vhd
from livesnap.datapaths import vhd_files
from livesnap.tools import lvm


def _device_size(path):
    """The LV's size as its device here shows it, None without a device."""
    try:
        return lvm.device_size(path)
    except OSError:
        return None


def _chain(leaf):
    try:
        return vhd.chain_paths(leaf)
    except vhd.VhdError:
        return [leaf]


class RemoteTapdiskDatapath(vhd_files.TapdiskDatapath):
    name = "tapdisk-remote"
    manages_activation = True

    def __init__(self, domain):
        super(RemoteTapdiskDatapath, self).__init__(domain)
        self.pool = domain.pool_pause()
        self.sizes = {}                  # LV path -> its size as the other hosts last saw it
        for d in domain.disks():
            if domain.snapshottable(d) and lvm.split_path(d.path) is not None:
                for p in _chain(d.path):
                    self.sizes[p] = _device_size(p)
        self.before = {}                 # disk -> its chain when the pause began

    def _views(self, when, disk, recorded=None):
        """What the other hosts must do for ``disk`` at ``when`` (xapi_pool.PoolPause)."""
        leaf = self._leaf_path(disk)
        if lvm.split_path(leaf) is None:
            return "" if when == "chain" else []
        if when == "chain":
            return " ".join(_chain(leaf))
        if when == "resume":
            self.before[disk] = (recorded or "").split() or [leaf]
            return []
        if when == "before":
            self.before[disk] = _chain(leaf)
            return [("deactivateNoRefcount",) + lvm.split_path(leaf)]
        new = _chain(leaf)
        old = self.before.pop(disk, new)
        out = [("refresh", leaf)]
        for p in new[1:]:
            if p not in old:
                out.append(("activate", p))
            elif _device_size(p) != self.sizes.get(p):
                out.append(("refresh", p))
        for p in old[1:]:
            if p not in new:
                if lvm.lv_exists(*lvm.split_path(p)):
                    out.append(("deactivate", p))
                else:
                    out += [("deactivateNoRefcount", p), ("cleanupLockAndRefcount", p)]
        for p in new:
            self.sizes[p] = _device_size(p)
        return [(a,) + lvm.split_path(p) for a, p in out]

    @contextlib.contextmanager
    def _paused(self, disks):
        """The pause on the VM's host (the window from the first pause to the last
        unpause, the XAPI round trips and the other host's LV updates included)."""
        window = vhd_files._Window()

        def started(stack):
            stack.callback(window.stop, time.monotonic())
        with self.pool.paused(disks, self._views, started):
            yield window

    def heal(self):
        return self.pool.heal([d.target for d in self.domain.disks()
                               if self.domain.snapshottable(d)], self._views)
