"""A VM's livesnap catalog handed to another host of the pool on purpose (issue 13): before
the holding host leaves the pool, or to the new master of an LVHD VM's pool
(platforms/xapi_catalog.py records which host holds it; xapi_pool.refuse_wrong_host says who
acts). The plugin's ``catalog_move`` on the holding host runs ``send``; it reaches the
target's ``catalog_receive`` (``receive``) through XAPI's ``host.call_plugin``.

Order, each step leaving a state the key explains (a crash between two leaves no VM
without its catalog and never two hosts acting):

1. on the holder, under the VM's lock: its catalog here and the key naming this host (or no
   key), no unfinished operation (``recover`` first: its journal and paused tapdisks are
   this host's business), the WAL checkpointed into the file, the file read;
2. the target writes it into its state directory (a temporary file renamed under the VM's
   lock there), refusing if it has a catalog of the VM already or if XAPI's key does not
   name the sender: a copy the key does not name is refused by every command there
   (xapi_catalog.check_here), so a crash here leaves the holder in charge;
3. the key set to the target: from now on the target acts, the holder is refused;
4. the holder's catalog removed (its lock last, still held).

Python 3.6, stdlib only.
"""
import base64
import logging
import os
import sqlite3

from livesnap import statedir
from livesnap.errors import CatalogError, Error, InterruptedOperation, UsageError
from livesnap.lock import DomainLock
from livesnap.platforms import xapi_catalog

log = logging.getLogger(__name__)

PLUGIN = "livesnap"
MAX_BYTES = 32 << 20             # the largest catalog handed over (base64 in one argument)


def _host(platform, host_uuid):
    try:
        return platform.call("host.get_by_uuid", host_uuid)
    except Error:
        raise UsageError(reason="no host %s in this pool" % host_uuid)


def send(engine, vm, to_host):
    """The catalog of ``vm`` (a uuid or name) handed to host ``to_host`` (a uuid). Returns
    {domain, from_host, to_host, catalog}."""
    platform = engine.platform
    domain = engine.lookup(vm)
    here_ref = platform.this_host()
    if here_ref is None:
        raise UsageError(reason="this session cannot say which host it is on")
    here = platform.call("host.get_uuid", here_ref).lower()
    to_host = to_host.lower()
    if to_host == here:
        raise UsageError(reason="the catalog of VM %s is on this host (%s) already"
                                % (domain.name, here))
    target = _host(platform, to_host)
    state_dir = statedir.ready(engine.state_dir)
    files = statedir.domain_files(state_dir, domain.uuid)
    db = files[0]
    with DomainLock(files[-1], domain.name):
        xapi_catalog.check_here(domain, db, os.path.exists(db))
        if not os.path.exists(db):
            raise CatalogError(db, "this host has no livesnap catalog of VM %s to hand over"
                               % domain.name)
        data = _read(db, domain.name)
        platform.call("host.call_plugin", target, PLUGIN, "catalog_receive",
                      {"vm_uuid": domain.uuid, "from_host": here,
                       "catalog": base64.b64encode(data).decode("ascii")})
        platform.call("VM.remove_from_other_config", domain.ref, xapi_catalog.KEY)
        platform.call("VM.add_to_other_config", domain.ref, xapi_catalog.KEY,
                      xapi_catalog.value(to_host, domain.uuid))
        for path in files[:-1]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.unlink(files[-1])           # the lock last, still held
    log.info("the catalog of VM %s was handed from host %s to host %s", domain.name, here,
             to_host)
    return {"domain": domain.name, "from_host": here, "to_host": to_host, "catalog": db}


def _read(db, name):
    """The catalog file's bytes, its WAL checkpointed in; refused with an unfinished
    operation."""
    from livesnap.catalog import Catalog
    cat = Catalog(db)
    try:
        op = cat.unfinished()
        if op is not None:
            raise InterruptedOperation(name, op.id, op.op)
        cat.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        cat.close()
    with open(db, "rb") as f:
        data = f.read()
    if len(data) > MAX_BYTES:
        raise CatalogError(db, "%d bytes: too large to hand over (at most %d)"
                           % (len(data), MAX_BYTES))
    return data


def receive(engine, vm_uuid, from_host, text):
    """The catalog of VM ``vm_uuid`` sent by host ``from_host`` (base64 ``text``) written
    into this host's state directory. Returns {domain, catalog}."""
    domain = engine.lookup(vm_uuid)
    held = xapi_catalog.holder(domain)
    if held is not None and held != from_host.lower():
        raise CatalogError(vm_uuid, "XAPI records host %s as holding the catalog, not the "
                           "sender %s" % (held, from_host))
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeError) as e:
        raise UsageError(reason="catalog: not base64 (%s)" % e)
    state_dir = statedir.ready(engine.state_dir)
    files = statedir.domain_files(state_dir, domain.uuid)
    db = files[0]
    with DomainLock(files[-1], domain.name):
        if os.path.exists(db):
            raise CatalogError(db, "this host has a livesnap catalog of VM %s already (a "
                               "stale one?): move it aside first" % domain.name)
        tmp = db + ".receiving"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            _check(tmp, domain.name)
        except Exception:
            os.unlink(tmp)
            raise
        os.rename(tmp, db)
        fd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    log.info("the catalog of VM %s received from host %s", domain.name, from_host)
    return {"domain": domain.name, "catalog": db}


def _check(path, name):
    from livesnap.catalog import Catalog
    try:
        cat = Catalog(path)
    except sqlite3.DatabaseError as e:
        raise CatalogError(path, str(e))
    try:
        cat.load_tree()
        if cat.unfinished() is not None:
            raise CatalogError(path, "it has an unfinished operation")
        cat.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        cat.close()
    for suffix in ("-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
