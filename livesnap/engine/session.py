"""One command's hold on one domain (``Session``), taken and given back by
``SessionContext``: the domain looked up, its lock, its catalog (in memory for a dry run on
a domain seen for the first time), the preflight that must refuse before a catalog is made,
and at the end the datapath closed, the lock released and merged-away images freed
(datapaths.trash). ``SignalCatcher`` turns SIGINT/SIGTERM during execution into a recorded
signal, so the running step finishes and is journaled."""
import os
import signal

from livesnap import statedir
from livesnap.catalog import Catalog
from livesnap.datapaths import trash
from livesnap.lock import DomainLock


class Session(object):
    """One command's hold on one domain: the domain, its catalog, its tree, a datapath."""

    def __init__(self, engine, domain, catalog):
        self.engine = engine
        self.domain = domain
        self.catalog = catalog
        self.tree = None
        self.datapath = None
        self.dry_run = False          # nothing may change: no catalog made, no metadata synced
        self.locked = False          # holds the domain's lock: may write the catalog
        self.followed = None         # what was followed of changes made with virsh
        self.follow_error = None     # why they could not be followed



class SessionContext(object):
    def __init__(self, engine, ident, lock, dry_run=False, preflight=None):
        self.engine = engine
        self.ident = ident
        self.dry_run = dry_run
        self.preflight = preflight
        self.take_lock = lock
        self.lock = None
        self.session = None

    def __enter__(self):
        from livesnap.datapaths import own_files
        own_files.set_roots(self.engine.storage_dirs)   # what a command may delete lies inside
        domain = self.engine.lookup(self.ident)
        state_dir = statedir.ready(self.engine.state_dir)
        if self.take_lock:
            self.lock = DomainLock(os.path.join(state_dir, domain.uuid + ".lock"), domain.name)
            self.lock.__enter__()
        catalog = None
        try:
            path = os.path.join(state_dir, domain.uuid + ".db")
            known = os.path.exists(path)
            held = getattr(domain, "catalog_here", None)     # XAPI: the host holding it
            if held is not None:
                held(path, known)
            if self.preflight is not None and not known:
                self.preflight(domain)          # first seen: no catalog made if refused
            if self.dry_run and not known:
                # a domain seen for the first time: its adoption is planned on, not kept
                catalog = Catalog(":memory:", domain.name)
            else:
                catalog = Catalog.for_domain(state_dir, domain.uuid, domain.name)
                kept = getattr(domain, "catalog_kept", None)   # XAPI: recorded as here
                if kept is not None:
                    kept()
            if self.preflight is not None and known and catalog.unfinished() is None:
                # (with an interrupted operation, the command names 'livesnap recover')
                self.preflight(domain)
        except Exception:
            if catalog is not None:
                catalog.close()
            if self.lock:
                self.lock.__exit__(None, None, None)
            raise
        self.session = Session(self.engine, domain, catalog)
        self.session.locked = self.take_lock
        self.session.dry_run = self.dry_run
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
            if tree is not None and not self.session.dry_run:
                # images merged away by this command, and any a dead process left behind
                # beside this domain's images, are freed after it (datapaths.trash)
                trash.sweep(os.path.dirname(n.path) for n in tree.nodes.values())
            if not self.session.dry_run:
                trash.release()
        return False


class SignalCatcher(object):
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
