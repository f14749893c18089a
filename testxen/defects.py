"""Defects of livesnap's Xen side that the real blktap shows and the old stand-ins did not. The
tests that hit them are expected failures (issue 12), each with its reason, until the issue
"XAPI: snapshots in SM's model" (13) fixes them."""
import pytest

LVHD_LOCATOR = pytest.mark.xfail(strict=True, reason=(
    "livesnap writes LVHD parent locators as ./VHD-<uuid>; libvhd resolves a relative locator "
    "against the resolved device name (here /dev/loopN, on a host /dev/mapper/VG_XenStorage--"
    "<sr>-VHD--<uuid>), so the real tapdisk cannot reopen the new leaf's chain at unpause "
    "(ENOENT after 10 retries) and the operation fails (issue 13, point 2)"))
# Not strict: the failure is a race with tapdisk's block allocation (most runs hit it).
OPEN_LEAF_READ = pytest.mark.xfail(strict=False, reason=(
    "delete's reparent step (vhd_files._reparent -> _parent -> livesnap.vhd.query) reads the "
    "metadata of the running leaf without pausing its tapdisk; when that meets a block the "
    "real tapdisk is allocating (BAT entry written, block not yet), livesnap's VHD reader calls "
    "the open leaf corrupt ('BAT entry N outside the data area') and the delete fails"))
