"""Which host of a XAPI pool holds a VM's livesnap catalog (issue 13).

livesnap's catalog of a VM (its names, hidden images, an unfinished operation's journal)
lives in the state directory of the host that made it (``/var/lib/livesnap``). A VM moves
between hosts (live migration, rolling pool upgrades, a new pool master), its catalog does
not. A command on a host without the catalog must not adopt the chain as new: the two
catalogs would then diverge (one merges what the other names). So when livesnap makes a
catalog for a XAPI VM it records in XAPI which host holds it, in the VM's ``other_config``:

    livesnap_catalog = "host=<host uuid> vm=<vm uuid>"

xapi keeps a VM's ``other_config`` in every power state (a running VM's too) and carries it
through a migration. ``VM.snapshot``/``VM.checkpoint``/``VM.clone``/``VM.copy``
(xapi_vm_clone.ml ``copy_vm_record``) copy it to the new record: the ``vm=`` part names the
VM the catalog is of, so a copy (a snapshot record, a clone, a template) reads as having no
key. (``VM.revert`` of an xe snapshot is expected to put back the VM's key as it was at the
snapshot: docs/xen.md.)

A command (``check_here`` before anything changes): a key naming another host -> refused
(``WrongHost`` naming it), whether or not this host has a catalog too (one made by an older
livesnap, or left behind: the key says which is the VM's); a key naming this host while this
host has no catalog -> an error that says so (the state directory was lost or emptied:
adopting would forget the catalog's hidden images and any unfinished operation); no key
(older livesnap, or a catalog never made) -> as before: a catalog here is used, none is made
by adoption. Once a catalog is here, ``record_here`` writes the key if it does not name this
host. A session that cannot say which host it is on (``session.get_this_host``) checks and
records nothing.

Python 3.6, stdlib only.
"""
import logging

from livesnap.errors import CatalogError, Error, WrongHost

log = logging.getLogger(__name__)

KEY = "livesnap_catalog"


def value(host_uuid, vm_uuid):
    return "host=%s vm=%s" % (host_uuid, vm_uuid)


def parse(text):
    """{"host": uuid, "vm": uuid} of a key's value, or None when it is not one."""
    out = {}
    for part in str(text or "").split():
        k, sep, v = part.partition("=")
        if sep and k in ("host", "vm") and v:
            out[k] = v.lower()
    return out if set(out) == {"host", "vm"} else None


def holder(domain):
    """The uuid of the host whose state directory holds ``domain``'s catalog as XAPI
    records it, or None (no key, or a key copied from another VM's record)."""
    other_config = domain.platform.call("VM.get_other_config", domain.ref) or {}
    got = parse(other_config.get(KEY))
    if got is None or got["vm"] != domain.uuid.lower():
        return None
    return got["host"]


def _here(domain):
    """(this host's ref, its uuid), or (None, None) when the session cannot say."""
    ref = domain.platform.this_host()
    if ref is None:
        return None, None
    return ref, domain.platform.call("host.get_uuid", ref).lower()


def check_here(domain, catalog_path, have):
    """Before a command reads or makes ``domain``'s catalog (``have``: this host's state
    directory has it at ``catalog_path``): refused when the key names another host, an
    error when it names this one and the catalog is not here. Returns whether nothing is
    left to record (the key names this host, or the session cannot say which it is)."""
    ref, here = _here(domain)
    if here is None:
        return True
    held = holder(domain)
    if held is None:
        return False
    if held == here and have:
        return True
    if held == here:
        raise CatalogError(catalog_path, "XAPI records this host (%s) as holding the livesnap "
                           "catalog of VM %s (%s), but it is not here: the state directory "
                           "was lost or emptied. livesnap does not adopt the VM's chain as new "
                           "(the catalog's hidden images and any unfinished operation would be "
                           "forgotten); restore the state directory, or remove the key (xe "
                           "vm-param-remove uuid=%s param-name=other-config param-key=%s) to "
                           "adopt the chain as it is" % (here, domain.name, domain.uuid,
                                                         domain.uuid, KEY))
    why = "its livesnap catalog is on host %s (VM other_config %s)" % (held, KEY)
    if have:
        why += "; the catalog here (%s) is not the VM's current one" % catalog_path
    raise WrongHost(domain.name, held, why)


def record_here(domain):
    """The key set to name this host (its state directory holds the catalog now), unless it
    already does. A failure is logged: the catalog works without it (as an older one)."""
    ref, here = _here(domain)
    if here is None:
        return
    try:
        if holder(domain) == here:
            return
        domain.platform.call("VM.remove_from_other_config", domain.ref, KEY)
        domain.platform.call("VM.add_to_other_config", domain.ref, KEY,
                             value(here, domain.uuid))
    except Error as e:
        log.warning("VM %s: which host holds its catalog not recorded in XAPI: %s",
                    domain.name, e)

