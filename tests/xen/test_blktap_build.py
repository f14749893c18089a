"""scripts/build-blktap.sh and the tests' lookup of its build: a second run does not rebuild,
the lookup finds the same prefix, and a missing build is an error, not a skip."""
import os
import subprocess

import pytest

from testxen import blktap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_second_run_does_not_rebuild():
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "build-blktap.sh")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == blktap.prefix()
    assert p.stderr == ""                               # no apt, no configure, no make
    for tool in ("sbin/tap-ctl", "sbin/cbt-util", "bin/vhd-util", "libexec/tapdisk", "testbed/tap-ctl"):
        assert os.access(os.path.join(blktap.prefix(), tool), os.X_OK), tool


def test_a_missing_build_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LIVESNAP_CACHE", str(tmp_path))
    monkeypatch.setattr(blktap, "_prefix", [])
    with pytest.raises(blktap.MissingBuild) as ei:
        blktap.prefix()
    assert str(tmp_path) in str(ei.value) and "build-blktap.sh" in str(ei.value)
