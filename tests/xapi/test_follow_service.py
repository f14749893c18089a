"""``livesnap xapi-follow`` as a host service (livesnap/platforms/xapi_follow.py,
xapi_link.py, engine/gone.py), on the XAPI stand-in with SM's real ``vdi_delete`` behind
``VDI.destroy`` and real tapdisks:

* xapi restarting under the follower (its socket cut and refusing, its sessions gone) while a
  snapshot is deleted: the follower logs the loss once, logs in again and merges what the
  delete left; SIGTERM ends it cleanly while it waits and while it retries; the unit has no
  start limit;
* pools: the follower of the host that owns a VM acts on it (running: where it runs;
  halted, or with a disk on LVHD: the master); any other skips it quietly, and the master's
  refusal of a running LVHD VM on another host is logged once;
* a merge refused while SM is busy with the VDI (``mirror``, ``paused``) or another command
  holds the VM is tried again until it is done;
* the catalog of a VM ``xe vm-uninstall`` removed goes once nothing of it is left."""
import configparser
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from testxen import blktap as txblktap
from testxen import sm as smmod
from testxen import xapi as txxapi
from testxen import xe
from testxen.world import ROOT

from test_sm_gc import MiB, _fold_sr, _fold_vm, blktap, sm, sm_tree  # noqa: F401
from test_xapi_events import (_check_sm_end_state, _face, _ipc_dir, _readline, _vdi_destroy,
                              _wait, _xe, sm_world)  # noqa: F401
from test_hosts import _other_host


class Door(object):
    """A second socket of the XAPI stand-in, the follower's only: ``close()`` is xapi going
    away in a toolstack restart (calls under way cut off, the socket refusing connections,
    the sessions made through it forgotten), ``open()`` xapi back."""

    def __init__(self, xapi, path):
        self.xapi = xapi
        self.path = path
        self.sessions = set()
        self.conns = set()
        self.server = None
        self.refuser = None
        self.open()

    def open(self):
        door = self

        class Server(txxapi._UnixXMLRPCServer):
            def process_request(self, request, client_address):
                door.conns.add(request)
                super(Server, self).process_request(request, client_address)

            def shutdown_request(self, request):
                door.conns.discard(request)
                super(Server, self).shutdown_request(request)

            def handle_error(self, request, client_address):
                pass                            # a reply to a connection cut off

            def _dispatch(self, method, params):
                out = super(Server, self)._dispatch(method, params)
                if method.startswith("session.") and "login" in method and \
                        out.get("Status") == "Success":
                    door.sessions.add(out["Value"])
                return out

        if self.refuser is not None:
            self.refuser.close()
            os.unlink(self.path)
            self.refuser = None
        self.server = Server(self.path, self.xapi)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        for c in list(self.conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server.server_close()
        os.unlink(self.path)
        # a dead xapi's socket: there, refusing connections (ECONNREFUSED)
        self.refuser = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.refuser.bind(self.path)
        self.xapi.sessions -= self.sessions

    def hang(self):
        """A xapi that hangs: its socket takes connections and never answers."""
        self.refuser.listen(16)

    def shut(self):
        if self.refuser is not None:
            self.refuser.close()
        elif self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def door(world):
    d = Door(world.xapi, os.path.join(world.base, "door"))
    try:
        yield d
    finally:
        d.shut()


def _start(world, socket_path, err_path, *extra, **env):
    """The follower on ``socket_path`` run as its unit runs it (livesnap.cli.main: never
    handed to the livesnap service), its stderr in the file ``err_path``."""
    argv = [sys.executable, "-m", "livesnap.cli.main", "xapi-follow", "--xapi-socket",
            socket_path,
            "--sm-ipc-dir", os.path.join(world.base, "sm", "ipc")] + list(extra)
    with open(err_path, "w") as err:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                universal_newlines=True, env=world.env(**env), cwd=ROOT)


def _following(world, p):
    """Until the follower has taken its event.from token."""
    _wait(lambda: any(m == "event.from" for m, _ in world.xapi.calls), p)


def _stop(p, err_path):
    """SIGTERM; the follower ends at once with status 0, no traceback. (rest of stdout,
    stderr)"""
    p.send_signal(signal.SIGTERM)
    try:
        rest, _ = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError("the follower did not stop on SIGTERM", open(err_path).read())
    err = open(err_path).read()
    assert p.returncode == 0 and "Traceback" not in err, (p.returncode, err)
    return rest, err


def _once(world, *extra):
    """``xapi-follow --once --debug``: ([reports], stderr)."""
    p = subprocess.run([sys.executable, "-m", "livesnap", "xapi-follow", "--xapi-socket",
                        world.socket, "--once", "--debug"] + list(extra),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       env=world.env(), cwd=ROOT, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()], p.stderr


# -- xapi restarts, SIGTERM, the unit ---------------------------------------------------------

def test_xapi_restart_while_following_then_delete_merged(sm_world, sm, door, tmp_path):
    """The follower following the running VM's s1; xapi goes away (the follower's event.from
    cut off, its socket refusing, its session forgotten); s1 is deleted meanwhile (SM
    unlinks its face: no event reaches the follower). xapi back: the follower logs in again,
    compares and folds s1's base copy into the running leaf; the loss is logged once."""
    world = sm_world
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), world.sr)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    vm.start()
    err = str(tmp_path / "err")
    p = _start(world, door.path, err)
    try:
        _following(world, p)
        door.close()
        _wait(lambda: "lost the link to xapi" in open(err).read(), p)
        _vdi_destroy(world, _face(world, "s1"))
        first = list(door.sessions)
        door.open()
        out = json.loads(_readline(p))
        assert out["vm_uuid"] == vm.uuid and "error" not in out, (out, open(err).read())
        assert out["result"]["followed_sm"]["deleted"] == ["s1"], out
        assert [m["method"] for m in out["result"]["merges"]] == ["fold"], out
        # a new session, a new token ("") after the outage
        assert len(door.sessions) == 2 and first[0] not in world.xapi.sessions, door.sessions
        assert [a[1] for m, a in world.xapi.calls if m == "event.from"].count("") == 2
    finally:
        rest, log = _stop(p, err)
    assert rest.strip() == "", rest
    assert log.count("lost the link to xapi") == 1, log
    assert not door.sessions & world.xapi.sessions          # logged out at the end
    _check_sm_end_state(world, sm, world.sr, vm, disk, expected)


@pytest.mark.parametrize("when", ["waiting", "retrying"])
def test_sigterm_ends_the_follower_cleanly(world, door, tmp_path, when):
    """SIGTERM while the follower waits in event.from (xapi up: its session logged out) or
    while it waits to log in again (xapi away, its backoff): exit status 0 at once, no
    traceback."""
    err = str(tmp_path / "err")
    p = _start(world, door.path, err)
    _following(world, p)
    if when == "retrying":
        door.close()
        _wait(lambda: "lost the link to xapi" in open(err).read(), p)
    rest, log = _stop(p, err)
    assert rest.strip() == "", rest
    if when == "waiting":
        assert len(door.sessions) == 1 and not door.sessions & world.xapi.sessions


def test_follower_started_before_xapi(sm_world, sm, door, tmp_path):
    """The follower started while xapi is not up yet (its socket refusing): it says so once,
    keeps trying, and once xapi answers compares and folds what a delete left."""
    world = sm_world
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), world.sr)
    vm.start()
    _vdi_destroy(world, _face(world, "s1"))
    door.close()
    err = str(tmp_path / "err")
    p = _start(world, door.path, err)
    try:
        _wait(lambda: "cannot log in to xapi" in open(err).read(), p)
        door.open()
        out = json.loads(_readline(p))
        assert out["vm_uuid"] == vm.uuid and "error" not in out, out
        assert [m["method"] for m in out["result"]["merges"]] == ["fold"], out
    finally:
        rest, log = _stop(p, err)
    assert log.count("cannot log in to xapi") == 1, log
    vm.stop()


def test_hung_xapi_is_a_lost_one(world, door, tmp_path):
    """xapi taking connections and never answering: the follower's call times out
    (``--call-timeout``), which is a lost link: it keeps trying and follows once xapi
    answers."""
    door.close()
    door.hang()
    err = str(tmp_path / "err")
    p = _start(world, door.path, err, "--call-timeout", "1")
    try:
        _wait(lambda: "cannot log in to xapi (timed out)" in open(err).read(), p)
        door.open()
        _following(world, p)
    finally:
        _stop(p, err)


def test_sigterm_during_a_merge_stops_after_it(sm_world, sm, tmp_path):
    """SIGTERM while the follower merges (held at the plan's first step): the engine's own
    signal catcher lets the step finish; the follower still sees the signal and ends (status
    0, no traceback) instead of following on; what is left is finished at its next start."""
    world = sm_world
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), world.sr)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    vm.start()
    err, reached, release = (str(tmp_path / n) for n in ("err", "reached", "release"))
    p = _start(world, world.socket, err, LIVESNAP_FAULT="*:before:0:wait",
               LIVESNAP_FAULT_REACHED=reached, LIVESNAP_FAULT_RELEASE=release)
    try:
        _following(world, p)
        _vdi_destroy(world, _face(world, "s1"))
        _wait(lambda: os.path.exists(reached), p)
        p.send_signal(signal.SIGTERM)
    finally:
        open(release, "w").close()
    rest, log = _stop(p, err)
    _once(world)
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    assert _once(world)[0] == []
    _check_sm_end_state(world, sm, world.sr, vm, disk, expected)


def test_what_is_a_lost_link():
    """The failures that lost xapi (log in again) and those that are xapi's answer."""
    import http.client
    import xmlrpc.client
    from livesnap.platforms.xapi import XapiError
    from livesnap.platforms.xapi_link import is_lost

    def wrapped(exc):
        try:
            try:
                raise exc
            except Exception as e:                      # as XapiPlatform.call does
                raise XapiError("event.from", "%s: %s" % (e.__class__.__name__, e))
        except XapiError as e:
            return e
    lost = [ConnectionRefusedError(111, "refused"), ConnectionResetError(104, "reset"),
            FileNotFoundError(2, "no socket"), socket.timeout("timed out"),
            http.client.RemoteDisconnected("closed"), BrokenPipeError(32, "pipe"),
            xmlrpc.client.Fault(500, "Tried 3 times to get a valid session, but failed"),
            xmlrpc.client.ProtocolError("/", 503, "down", {})]
    for exc in lost:
        assert is_lost(exc) and is_lost(wrapped(exc)), exc
    for details in (["SESSION_INVALID", "OpaqueRef:x"], ["HOST_STILL_BOOTING"],
                    ["HANDLE_INVALID", "session", "OpaqueRef:x"]):
        assert is_lost(XapiError("VM.get_by_uuid", details)), details
    for details in (["UUID_INVALID", "VM", "x"], ["HANDLE_INVALID", "VDI", "OpaqueRef:x"],
                    ["VDI_IN_USE", "OpaqueRef:x", "destroy"]):
        assert not is_lost(XapiError("VM.get_by_uuid", details)), details
    assert not is_lost(wrapped(ValueError("bad")))


def test_once_without_xapi_is_a_clear_error(tmp_path):
    """``--once`` with no xapi to talk to: one line naming the failure, status 1."""
    p = subprocess.run([sys.executable, "-m", "livesnap", "xapi-follow", "--once",
                        "--xapi-socket", str(tmp_path / "no-xapi"), "--state-dir",
                        str(tmp_path / "state")], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, cwd=ROOT, timeout=60)
    assert p.returncode == 1 and p.stdout == "", (p.returncode, p.stdout, p.stderr)
    assert p.stderr.startswith("error: XenAPI call session.login_with_password failed") and \
        "Traceback" not in p.stderr, p.stderr


def test_unit_restarts_without_start_limit(tmp_path):
    """The unit restarts the follower always, after a pause, and systemd's start limit
    (5 starts in 10 s, then never again) is off, in both spellings (systemd 219 of
    XenServer/XCP-ng 8: [Service] StartLimitInterval; newer: [Unit] StartLimitIntervalSec)."""
    p = subprocess.run([sys.executable, "-m", "livesnap", "xapi-follow", "--state-dir",
                        str(tmp_path / "state"), "--install-unit", str(tmp_path / "units")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str
    unit.read(str(tmp_path / "units" / "livesnap-xapi-follow.service"))
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"
    assert unit["Service"]["StartLimitInterval"] == "0"
    assert unit["Service"]["Restart"] == "always"
    assert float(unit["Service"]["RestartSec"]) > 0


# -- pools: who acts --------------------------------------------------------------------------

def _older_catalog(x, vm):
    """The VM's catalog as an older livesnap left it: XAPI does not record which host holds
    it (no ``livesnap_catalog`` key), so who acts follows ``xapi_follow.owner`` (the
    catalog's host acting wherever the VM runs: tests/xapi/test_pool_files.py)."""
    from livesnap.platforms import xapi_catalog
    x.record("VM", vm.ref)["other_config"].pop(xapi_catalog.KEY)


@pytest.mark.parametrize("case", ["runs_elsewhere", "halted_master_elsewhere",
                                  "runs_here_master_elsewhere"])
def test_the_owning_hosts_follower_acts(sm_world, sm, case):
    """A snapshot of a VM on a file SR deleted with xe. A running VM is its resident host's
    business, a halted one the master's: another host's follower skips it quietly (a debug
    line, no report, no WRONG_HOST); the owner's merges it."""
    world = sm_world
    x = world.xapi
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), world.sr)
    _older_catalog(x, vm)
    other = _other_host(x)
    if case != "halted_master_elsewhere":
        vm.start()
    if case == "runs_elsewhere":
        x.record("VM", vm.ref)["resident_on"] = other
    else:
        x.record("pool", x.pool)["master"] = other
    _vdi_destroy(world, _face(world, "s1"))
    if case != "runs_here_master_elsewhere":
        out, err = _once(world)
        assert out == [], out
        assert "acts on it, not this one" in err and "WARNING" not in err, err
        assert "ERROR" not in err, err
        if case == "runs_elsewhere":
            x.record("VM", vm.ref)["resident_on"] = x.host
        else:
            x.record("pool", x.pool)["master"] = x.host
    out, err = _once(world)
    r, = out
    assert "error" not in r and r["result"]["followed_sm"]["deleted"] == ["s1"], r
    assert [m["method"] for m in r["result"]["merges"]] == ["fold"], r
    assert r["result"]["datapath"] == ("vhd-offline" if case == "halted_master_elsewhere"
                                       else "tapdisk"), r
    if case != "halted_master_elsewhere":
        vm.stop()


def _in_process_follower(world, sm, monkeypatch, reports):
    from livesnap.engine.engine import Engine
    from livesnap.platforms import xapi_follow
    from livesnap.platforms.xapi import XapiPlatform
    for k, v in world.env().items():
        monkeypatch.setenv(k, v)
    platform = XapiPlatform(_xe(world), sr_mount_base=world.sr_base,
                            sm_lock_dir=world.sm_lock_dir, sm_ipc_dir=_ipc_dir(sm))
    engine = Engine(state_dir=world.state_dir, storage_dirs=[world.sr_base, "/dev"],
                    platform=platform)
    return xapi_follow.Follower(platform, engine, world.state_dir, report=reports.append)


def _due(f):
    """Every retry of the follower ``f`` due now (as if its backoff had passed)."""
    for vm, (when, delay) in list(f.retry.items()):
        f.retry[vm] = (0.0, delay)


def test_lvhd_vm_is_the_masters(request, sm_world, sm, monkeypatch, caplog):
    """A VM with its disk on LVHD, its snapshot deleted with xe. It runs on another host: the
    master's follower owns it (LVM metadata) but cannot act there yet (WRONG_HOST), said
    once however often it compares; a follower that is not the master skips it; halted, the
    master's merges it."""
    world = sm_world
    x = world.xapi
    sr = _fold_sr(request, world, sm, "lvm")
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), sr)
    _older_catalog(x, vm)
    other = _other_host(x)
    _vdi_destroy(world, _face(world, "s1"))
    reports = []
    f = _in_process_follower(world, sm, monkeypatch, reports)
    rec = x.record("VM", vm.ref)
    rec.update(power_state="Running", resident_on=other)      # runs on host2, no tapdisk here
    caplog.set_level(logging.INFO, logger="livesnap")
    for i in range(3):
        n = len(x.calls)
        _due(f)
        f.reconcile()
        # tried each time: the engine's preflight, asked before SM's GC is held off, names
        # the host the VM runs on
        assert ("host.get_uuid", [other]) in x.calls[n:], i
    told = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(told) == 1 and "runs on host" in told[0].getMessage(), told
    r, = reports
    assert r["vm_uuid"] == vm.uuid and r["wrong_host"] is True and "error" in r, r
    assert "gc_aborted" not in r, r                 # SM's GC not asked to stop for nothing
    # on host2 (the master elsewhere), the VM running here: the master's, skipped
    x.record("pool", x.pool)["master"] = other
    rec["resident_on"] = x.host
    _due(f)
    assert f.reconcile() == [] and len(reports) == 1
    # halted, this host the master: merged
    x.record("pool", x.pool)["master"] = x.host
    rec.update(power_state="Halted", resident_on=txxapi.NULL_REF)
    _due(f)
    r, = f.reconcile()
    assert "error" not in r and r["result"]["followed_sm"]["deleted"] == ["s1"], r
    assert [m["method"] for m in r["result"]["merges"]] == ["fold"], r
    assert r["result"]["datapath"] == "vhd-offline", r
    assert [rr for rr in caplog.records if rr.levelno >= logging.WARNING] == told
    f.platform.session.xenapi.session.logout()


# -- refused, tried again ---------------------------------------------------------------------

@pytest.mark.parametrize("busy", ["mirror", "paused", "lock"])
def test_refused_merge_is_tried_again(sm_world, sm, tmp_path, busy):
    """s1 deleted with xe while SM mirrors the VM's disk (storage migration: sm_config
    ``mirror``), or has it paused, or another livesnap command holds the VM: the follower
    reports the refusal once and tries again by itself (no other event comes); once the key
    is gone (the lock released) the base copy is folded."""
    world = sm_world
    x = world.xapi
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), world.sr)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    vm.start()
    leaf, = [r for r in x.objects["VDI"] if x.vdi_path(r) == disk]
    holder = None
    if busy == "lock":
        holder = os.open(os.path.join(world.state_dir, vm.uuid + ".lock"), os.O_RDWR)
        fcntl.flock(holder, fcntl.LOCK_EX)
    else:
        x.call("VDI.add_to_sm_config", [world.session, leaf, busy, "true"])
    err = str(tmp_path / "err")
    p = _start(world, world.socket, err)
    try:
        _following(world, p)
        _vdi_destroy(world, _face(world, "s1"))
        out = json.loads(_readline(p))
        assert out["vm_uuid"] == vm.uuid and out["retry"] is True, out
        assert "result" not in out, out
        if busy != "lock":
            assert "gc_aborted" not in out, out      # SM's GC not asked to stop for nothing
        if busy == "mirror":
            # two more tries, neither reported again
            n = len(x.calls)
            _wait(lambda: [m for m, a in x.calls[n:]
                           if m == "VDI.get_record" and a == [leaf]].__len__() >= 4, p)
        if holder is not None:
            os.close(holder)
        else:
            x.call("VDI.remove_from_sm_config", [world.session, leaf, busy])
        out = json.loads(_readline(p))
        assert out["vm_uuid"] == vm.uuid and "error" not in out, out
        assert [m["method"] for m in out["result"]["merges"]] == ["fold"], out
    finally:
        rest, _ = _stop(p, err)
    assert rest.strip() == "", rest
    _check_sm_end_state(world, sm, world.sr, vm, disk, expected)


# -- VMs gone ---------------------------------------------------------------------------------

def _statedir_files(world, vm_uuid):
    return sorted(n for n in os.listdir(world.state_dir) if n.startswith(vm_uuid))


@pytest.mark.parametrize("kind", ["ext", "lvm"])
def test_vm_uninstall_catalog_removed_once_nothing_is_left(request, sm_world, sm, kind):
    """``xe vm-uninstall`` of a halted VM with a livesnap snapshot (its disk and the snapshot's
    VDI destroyed): the base copy is left for SM's GC, so the catalog stays and the follower
    says what is left; once SM's GC removed it, the follower removes the catalog, its journal
    and its lock."""
    world = sm_world
    x = world.xapi
    sr = _fold_sr(request, world, sm, kind)
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), sr)
    for v in x.record("VM", vm.ref)["VBDs"]:
        x.record("VBD", v).setdefault("other_config", {})["owner"] = ""
    vm_uuid = vm.uuid
    s = _xe(world)
    try:
        xe.vm_uninstall(s, vm.ref)
    finally:
        s.xenapi.session.logout()
    assert _statedir_files(world, vm_uuid) != []
    out, err = _once(world)
    r, = out
    base, = r["images_left"]
    assert r["vm_uuid"] == vm_uuid and r["vm_gone"] is True and "error" not in r, r
    assert base != disk and os.path.basename(base)[-40:-4] != "", r
    assert _statedir_files(world, vm_uuid) != []
    sm.gc(sr)
    assert x.sr_images(sr) == {}
    out, err = _once(world)
    assert out == [{"vm_uuid": vm_uuid, "vm_gone": True, "catalog_removed": True}], out
    assert _statedir_files(world, vm_uuid) == []
    assert _once(world)[0] == []


def test_vm_uninstall_keeping_its_disk_keeps_the_catalog(sm_world, sm):
    """``xe vm-uninstall`` of a VM whose disk is not its own (no ``owner`` on its VBD: the
    VDI stays): its image is still there, so the catalog stays, reported, after SM's GC."""
    world = sm_world
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), world.sr)
    vm_uuid = vm.uuid
    s = _xe(world)
    try:
        xe.vm_uninstall(s, vm.ref)
    finally:
        s.xenapi.session.logout()
    sm.gc(world.sr)
    assert os.path.exists(disk)
    for _ in range(2):
        out, err = _once(world)
        assert out == [{"vm_uuid": vm_uuid, "vm_gone": True, "images_left": [disk]}], out
        assert "%s.db" % vm_uuid in _statedir_files(world, vm_uuid)


def test_forget_keeps_what_recover_could_need(tmp_path):
    """engine/gone.py on a catalog of its own: an image the unfinished operation would make
    keeps the catalog, as does an image on an SR not mounted (cannot tell) or the VM's lock
    held by a command; with every image known gone, every file of the VM goes."""
    from livesnap.catalog import Catalog
    from livesnap.engine import gone
    from livesnap.errors import Busy
    from livesnap.model.tree import ACTIVE, Node, Tree
    state, sr = tmp_path / "state", tmp_path / "sr"
    state.mkdir()
    sr.mkdir()
    vm = "0b4cd3a4-8d9e-4b43-9a55-5e0d1f7c2a11"
    leaf = str(sr / "leaf.vhd")
    unmounted = str(tmp_path / "not-mounted" / "other.vhd")
    new = str(sr / "new.vhd")
    cat = Catalog(str(state / (vm + ".db")), "vm")
    cat.save_tree(Tree([Node(id=1, disk="xvda", parent=None, state=ACTIVE, snapshot=None,
                             path=leaf, fmt="vhd", alloc=0),
                        Node(id=2, disk="xvdb", parent=None, state=ACTIVE, snapshot=None,
                             path=unmounted, fmt="vhd", alloc=0)],
                       [], {"xvda": 1, "xvdb": 2}))
    cat.db.execute("INSERT INTO operations (op, plan, status, started) VALUES (?, ?, ?, 0)",
                   ("create", json.dumps({"steps": [{"op": "new_leaf", "leaf_path": new}]}),
                    "running"))
    cat.close()
    open(new, "w").close()
    assert gone.forget_if_done(str(state), vm) == sorted([new, unmounted])
    os.unlink(new)
    assert gone.forget_if_done(str(state), vm) == [unmounted]
    os.makedirs(os.path.dirname(unmounted))                 # mounted, the image not there
    lock = os.open(str(state / (vm + ".lock")), os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    with pytest.raises(Busy):
        gone.forget_if_done(str(state), vm)
    os.close(lock)
    assert os.listdir(str(state)) != []
    assert gone.forget_if_done(str(state), vm) == []
    assert os.listdir(str(state)) == []
