"""Through the livesnap service, every default that comes from the environment is the
caller's, resolved in the command's own process: not the service's, and not one read once
when the service built its parser."""
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

from helpers import URI
from livesnap.service import wait_listening
from test_service import ROOT, Service, _wait_child

ENV_DEFAULTS = {"LIVESNAP_STATE_DIR": "/nonexistent/state", "LIBVIRT_DEFAULT_URI": "test:///default",
                "QEMU_IMG": "/nonexistent/qemu-img", "VHD_UTIL": "/nonexistent/vhd-util",
                "TAP_CTL": "/nonexistent/tap-ctl", "LVM": "/nonexistent/lvm",
                "LIVESNAP_READY_TIMEOUT": "1", "LIVESNAP_FAULT": "create:before:0"}


def run(env, *args, popen=False):
    cmd = [sys.executable, "-m", "livesnap"] + [str(a) for a in args]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=120)


def names(env, dom):
    p = run(env, "snapshot-list", dom.name, "--json")
    assert p.returncode == 0, p.stderr
    return [s["name"] for s in json.loads(p.stdout)["snapshots"]]


@pytest.fixture
def other_service(tmp_path, make_dom):
    """A service whose own environment names other defaults than its callers'."""
    dom = make_dom(ndisks=1)
    senv = dict(dom.env(), LIVESNAP_STATE_DIR=str(tmp_path / "service-state"))
    svc = Service(str(tmp_path / "run" / "s.sock"), senv)
    yield svc, dom
    rc, err = svc.stop()
    assert rc == 0, err


def test_a_callers_state_dir_holds_its_catalog_and_lock(other_service, tmp_path):
    """The issue's case: the service runs with LIVESNAP_STATE_DIR set (as the unit written
    by install-service does); a caller with its own gets its own catalog and lock."""
    svc, dom = other_service
    mine = dict(dom.env(), LIVESNAP_SERVICE=svc.sock)
    p = run(mine, "snapshot-create", dom.name, "s1", "--json")
    assert p.returncode == 0, p.stderr
    assert any(f.endswith(".db") for f in os.listdir(dom.state_dir))
    assert not os.path.exists(str(tmp_path / "service-state"))
    # the same catalog as a command run in its own process with that environment
    assert names(mine, dom) == names(dict(mine, LIVESNAP_SERVICE="off"), dom) == ["s1"]
    # another caller, another state directory: its own catalog (which adopts s1 from
    # libvirt's snapshot metadata)
    theirs = dict(mine, LIVESNAP_STATE_DIR=str(tmp_path / "theirs"))
    assert names(theirs, dom) == ["s1"]
    assert any(f.endswith(".db") for f in os.listdir(str(tmp_path / "theirs")))
    assert not os.path.exists(str(tmp_path / "service-state"))
    # --state-dir still wins over the environment
    p = run(theirs, "snapshot-list", dom.name, "--json", "--state-dir", dom.state_dir)
    assert [s["name"] for s in json.loads(p.stdout)["snapshots"]] == ["s1"], p.stderr


def test_the_domain_lock_is_the_callers_across_the_service_and_direct_commands(other_service):
    svc, dom = other_service
    mine = dict(dom.env(), LIVESNAP_SERVICE=svc.sock)
    first = run(dict(mine, LIVESNAP_FAULT="create:before:0:sleep=2"), "snapshot-create",
                dom.name, "s1", popen=True)
    child = _wait_child(svc)
    end = time.monotonic() + 30
    while _lock_holder(dom.state_dir) != str(child):    # the command's process holds it
        assert time.monotonic() < end, os.listdir(dom.state_dir)
        time.sleep(0.01)
    p = run(dict(mine, LIVESNAP_SERVICE="off"), "snapshot-create", dom.name, "s2")
    assert p.returncode == 1 and "another livesnap command" in p.stderr, p.stderr
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err


def _lock_holder(state_dir):
    try:
        for f in os.listdir(state_dir):
            if f.endswith(".lock"):
                with open(os.path.join(state_dir, f)) as fh:
                    return fh.read().strip()
    except OSError:
        pass
    return None


def test_the_callers_libvirt_uri_is_the_one_connected(tmp_path, make_dom):
    """The service's LIBVIRT_DEFAULT_URI is libvirt's test driver, the caller's the real
    libvirtd: the caller's domain is found. And the other way round: not found."""
    dom = make_dom(ndisks=1)
    svc = Service(str(tmp_path / "s.sock"), dict(dom.env(), LIBVIRT_DEFAULT_URI="test:///default"))
    try:
        mine = dict(dom.env(), LIVESNAP_SERVICE=svc.sock, LIBVIRT_DEFAULT_URI=URI)
        assert run(mine, "snapshot-create", dom.name, "s1").returncode == 0
        assert names(mine, dom) == ["s1"]
        test_driver = dict(mine, LIBVIRT_DEFAULT_URI="test:///default")
        via, direct = (run(test_driver, "snapshot-list", dom.name),
                       run(dict(test_driver, LIVESNAP_SERVICE="off"), "snapshot-list", dom.name))
        assert via.returncode == direct.returncode == 1
        assert via.stderr == direct.stderr == "error: domain '%s' not found\n" % dom.name
    finally:
        assert svc.stop()[0] == 0


def _recording_tool(path, log, real):
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho \"$@\" >> %s\nexec %s \"$@\"\n" % (log, real))
    os.chmod(path, stat.S_IRWXU)


def test_the_callers_tool_binaries_are_the_ones_run(tmp_path, make_dom):
    """QEMU_IMG of the service is never used for a caller without one; the caller's is."""
    dom = make_dom(ndisks=1)
    real = subprocess.run(["sh", "-c", "command -v qemu-img"], stdout=subprocess.PIPE,
                          text=True).stdout.strip()
    service_log, caller_log = str(tmp_path / "service.log"), str(tmp_path / "caller.log")
    _recording_tool(str(tmp_path / "service-qemu-img"), service_log, real)
    _recording_tool(str(tmp_path / "caller-qemu-img"), caller_log, real)
    svc = Service(str(tmp_path / "s.sock"),
                  dict(dom.env(), QEMU_IMG=str(tmp_path / "service-qemu-img")))
    try:
        mine = dict(dom.env(), LIVESNAP_SERVICE=svc.sock)
        mine.pop("QEMU_IMG", None)
        assert run(mine, "snapshot-create", dom.name, "s1").returncode == 0
        assert not os.path.exists(service_log)
        p = run(dict(mine, QEMU_IMG=str(tmp_path / "caller-qemu-img")),
                "snapshot-create", dom.name, "s2")
        assert p.returncode == 0, p.stderr
        assert not os.path.exists(service_log)
        with open(caller_log) as f:
            assert "create" in f.read()
        p = run(dict(mine, QEMU_IMG=str(tmp_path / "missing")), "snapshot-create", dom.name, "s3")
        assert p.returncode == 1 and str(tmp_path / "missing") in p.stderr, p.stderr
        assert names(mine, dom) == ["s1", "s2"]
    finally:
        assert svc.stop()[0] == 0


@pytest.mark.parametrize("var", sorted(ENV_DEFAULTS))
def test_no_default_is_read_from_the_environment_when_the_parser_is_built(monkeypatch, var):
    """The service builds the parser once: none of its defaults may depend on the
    environment it was built in (every sub-command's options compared)."""
    from livesnap.cli import main

    def defaults():
        parser = main.build_parser()
        out = {}
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        for name, sub in subs[0].choices.items():
            for action in sub._actions:
                out[(name, action.dest)] = action.default
        return out
    monkeypatch.delenv(var, raising=False)
    without = defaults()
    monkeypatch.setenv(var, ENV_DEFAULTS[var])
    assert defaults() == without


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "latin-1"},
                                 {"PYTHONIOENCODING": "ascii:backslashreplace"},
                                 {"PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}])
def test_the_callers_python_io_settings_shape_the_output(other_service, env):
    """The command's standard streams are opened as the interpreter would have opened
    them in the caller's environment: the same bytes through the service as in-process."""
    svc, dom = other_service
    outcomes = []
    for sock in (svc.sock, "off"):
        p = subprocess.run([sys.executable, "-m", "livesnap", "snapshot-list", "nö-such-dömain"],
                           env=dict(dom.env(), LIVESNAP_SERVICE=sock, **env), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        outcomes.append((p.returncode, p.stdout, p.stderr))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == 1 and outcomes[0][2].startswith(b"error: ")


def test_a_caller_running_another_livesnap_runs_its_own_code(other_service, tmp_path):
    """The caller's PYTHONPATH, or its working directory (python -m), chooses another copy
    of livesnap than the service's: that copy's code runs the command (its own process),
    not the service's; the service goes on serving its own callers."""
    svc, dom = other_service
    copy = tmp_path / "other"
    shutil.copytree(os.path.join(ROOT, "livesnap"), str(copy / "livesnap"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "livesnap" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "other-'))
    base = dict(dom.env(), LIVESNAP_SERVICE=svc.sock)
    base.pop("PYTHONPATH", None)
    for env, cwd in ((dict(base, PYTHONPATH=str(copy)), str(tmp_path)), (base, str(copy))):
        p = subprocess.run([sys.executable, "-m", "livesnap", "--version"], env=env, cwd=cwd,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.startswith("livesnap other-"), (p.stdout, p.stderr)
    p = run(base, "--version")
    assert p.returncode == 0 and not p.stdout.startswith("livesnap other-")
    first = run(dict(base, LIVESNAP_FAULT="create:before:0:sleep=1"), "snapshot-create",
                dom.name, "s1", popen=True)
    _wait_child(svc)                              # still served by the service
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert svc.proc.poll() is None


@pytest.mark.parametrize("mask", [0o077, 0o027, 0o002])
def test_files_the_command_makes_follow_the_callers_umask(tmp_path, make_dom, mask):
    """The service runs with umask 022; the catalog a caller's command creates has the
    mode the caller's umask gives it (sqlite's 0644 masked), as in its own process."""
    dom = make_dom(ndisks=1)
    sock = str(tmp_path / "s.sock")
    svc = subprocess.Popen([sys.executable, "-m", "livesnap", "service", "--socket", sock],
                           env=dom.env(), cwd=ROOT, preexec_fn=lambda: os.umask(0o022),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_listening(sock, svc, timeout=60)
        modes = []
        for via in (sock, "off"):
            state = str(tmp_path / ("state-" + os.path.basename(via)))
            os.makedirs(state, 0o700)
            p = subprocess.run([sys.executable, "-m", "livesnap", "snapshot-list", dom.name],
                               env=dict(dom.env(), LIVESNAP_SERVICE=via,
                                        LIVESNAP_STATE_DIR=state),
                               cwd=ROOT, preexec_fn=lambda: os.umask(mask),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               timeout=120)
            assert p.returncode == 0, p.stderr
            (db,) = [f for f in os.listdir(state) if f.endswith(".db")]
            modes.append(stat.S_IMODE(os.stat(os.path.join(state, db)).st_mode))
        assert modes == [0o644 & ~mask] * 2, [oct(m) for m in modes]
    finally:
        svc.terminate()
        svc.communicate(timeout=60)
