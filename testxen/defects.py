"""Defects of livesnap's Xen side that the real blktap shows and the old stand-ins did not. The
tests that hit them are expected failures (issue 12), each with its reason, until the issue
"XAPI: snapshots in SM's model" (13) fixes them. (The reads of a running leaf's BAT that the
real tapdisk's block allocation broke are fixed: tests/xen/test_open_leaf.py.)"""
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
