"""Defects of livesnap's Xen side that the real blktap shows and the old stand-ins did not. The
tests that hit them are expected failures (issue 12), each with its reason, until the issue
"XAPI: snapshots in SM's model" (13) fixes them."""
import pytest

# The LVHD parent locators (issue 13 point 2) are fixed; with them the real tapdisk reopens
# livesnap's LVHD chains, and these two XAPI plugin tests got further and met other defects:
LVHD_RECORDS = pytest.mark.xfail(strict=True, reason=(
    "observed after the locator fix: on an LVHD SR, an image's XAPI record (made by the SR scan "
    "the plugin asks for) carries an sm_config vhd-parent where the real vhd-util query finds "
    "no parent for that image; not yet explained (issue 13: records as SM's scan makes them)"))
LVHD_KEPT = pytest.mark.xfail(strict=True, reason=(
    "observed after the locator fix: on an LVHD SR with the VM's LVs inactive, snapshot_delete "
    "of s2 (one child, the kept leaf k) leaves s2 in the list instead of merging it; suspected: "
    "the users-of-an-image scan (issue 16) reads the LVs through their /dev/mapper names and "
    "takes livesnap's own chain for another user; not yet verified"))
# Not strict: the failure is a race with tapdisk's block allocation (most runs hit it).
OPEN_LEAF_READ = pytest.mark.xfail(strict=False, reason=(
    "delete's reparent step (vhd_files._reparent -> _parent -> livesnap.vhd.query) reads the "
    "metadata of the running leaf without pausing its tapdisk; when that meets a block the "
    "real tapdisk is allocating (BAT entry written, block not yet), livesnap's VHD reader calls "
    "the open leaf corrupt ('BAT entry N outside the data area') and the delete fails"))
