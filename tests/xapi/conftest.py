"""Fixtures for the XAPI plugin tests: the XAPI stand-in (``testxen/xapi.py``) on a UNIX socket,
a VM with two VHD disks on a file SR, served by real tapdisks (blktap, testxen/blktap.py) with
a guest writing through them over NBD, and the plugin run exactly as xapi runs it: the plugin
file itself with one argv holding the XML-RPC methodCall, its reply read from stdout. livesnap
runs the real tap-ctl and vhd-util (TAP_CTL, VHD_UTIL).

The world itself is testxen/world.py (the benchmarks use it too)."""
import os
import shutil
import uuid

import pytest

from testxen import blktap
from testxen import world as txworld
from testxen.world import ROOT, SIZE, Vm, World  # noqa: F401


@pytest.fixture(scope="session")
def xenapi_lib(tmp_path_factory):
    """A directory holding only the ``XenAPI`` package, for the plugin's interpreter."""
    return txworld.xenapi_lib(os.path.join(str(tmp_path_factory.mktemp("xenapi")), "lib"))


@pytest.fixture
def world(xenapi_lib, monkeypatch):
    try:
        blktap.prefix()
    except blktap.MissingBuild as e:
        pytest.fail(str(e), pytrace=False)
    base = "/tmp/xs-" + uuid.uuid4().hex[:10]      # short, and no "_" (XenAPI's UDS naming)
    os.makedirs(base)
    for k, v in blktap.env().items():
        monkeypatch.setenv(k, v)
    w = World(base, xenapi_lib)
    monkeypatch.setenv("TESTXEN_RUN_DIR", w.run_dir)
    try:
        yield w
    finally:
        w.xapi.stop()
        w.kill_all()
        shutil.rmtree(base, ignore_errors=True)
