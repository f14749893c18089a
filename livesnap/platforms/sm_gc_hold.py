"""SM's garbage collector held off an SR from before livesnap's first change of an operation
until the operation is finished, across a crash of livesnap, by the switch SM's GC reads from
XAPI's database: the SR's ``other_config:gc=false`` (``cleanup.py``: ``SR.gcEnabled``, read by
``_gc`` before it starts and by ``_gcLoop`` before each step; SM v3.2.12).

Why: ``sm_gc.held_off`` (SM's ``gc_active`` lock) dies with livesnap's process. A kill leaves
a half-done state in livesnap's journal (its catalog), not in SM's journals; after a reboot
SM attaches the SR and its GC runs on any ``SR.scan``, possibly before ``livesnap recover``.
A state such as "a hidden base copy with one child" (a revert between its steps, a delete
between the merge and the removal) is then leaf-coalesced or coalesced by the GC and the
image livesnap's journal names is gone: recover cannot finish (tests/xapi/
test_sm_gc_after_kill.py). The switch is in XAPI's database, so it outlives the process;
recover removes it when the operation is finished.

Who holds it: ``other_config:livesnap-gc-held`` lists the holders (VM uuids, one operation
per VM at a time), comma-separated, changed under SM's SR lock. When the first holder came
and ``gc`` was already ``false`` (the administrator's choice) the list starts with ``-`` and
``gc=false`` is left when the last livesnap holder goes."""
from livesnap.platforms import sm_lock

HELD_KEY = "livesnap-gc-held"
GC_KEY = "gc"
ADMIN = "-"


def _holders(oc):
    return [h for h in oc.get(HELD_KEY, "").split(",") if h]


def _write(platform, ref, oc, holders):
    platform.call("SR.remove_from_other_config", ref, HELD_KEY)
    if holders and holders != [ADMIN]:
        platform.call("SR.add_to_other_config", ref, HELD_KEY, ",".join(holders))
        if oc.get(GC_KEY) != "false":
            platform.call("SR.remove_from_other_config", ref, GC_KEY)
            platform.call("SR.add_to_other_config", ref, GC_KEY, "false")
    elif ADMIN not in holders and oc.get(GC_KEY) == "false":
        platform.call("SR.remove_from_other_config", ref, GC_KEY)


def change(platform, sr_uuids, holder, hold, lock_dir=sm_lock.BASE_DIR, timeout=60.0):
    """Add (``hold``) or remove ``holder`` on each SR of ``sr_uuids``; idempotent."""
    for sr_uuid in sorted(set(sr_uuids)):
        with sm_lock.sr_lock(sr_uuid, base_dir=lock_dir, timeout=timeout):
            ref = platform.call("SR.get_by_uuid", sr_uuid)
            oc = platform.call("SR.get_other_config", ref)
            holders = _holders(oc)
            if hold and holder not in holders:
                if not holders and oc.get(GC_KEY) == "false":
                    holders = [ADMIN]
                new = holders + [holder]
            elif not hold and holder in holders:
                new = [h for h in holders if h != holder]
            else:
                continue
            _write(platform, ref, oc, new)
