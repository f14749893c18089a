"""``livesnap service``: commands handed to the resident service behave exactly as commands
run in their own process (output, exit status, death by a signal, signals sent to the
caller, the domain lock), and the service steps aside when livesnap's code changes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from livesnap.service import wait_listening

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Service(object):
    def __init__(self, sock, env, pythonpath=None):
        self.sock = sock
        self.env = dict(env)
        if pythonpath:
            self.env["PYTHONPATH"] = pythonpath
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "livesnap", "service", "--socket", sock],
            env=self.env, cwd=pythonpath or ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        if not wait_listening(sock, self.proc, timeout=30):
            self.proc.kill()
            raise AssertionError("the service did not listen: %s" % (self.proc.communicate(),))

    def children(self):
        """pids whose parent is the service."""
        return _children_of(self.proc.pid)

    def commands(self):
        """The service's children running a command (on the caller's streams)."""
        return _commands_of(self.proc.pid)

    def spares(self):
        """The service's children waiting for a command (still on the service's streams)."""
        return [p for p in self.children() if p not in self.commands()]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


@pytest.fixture
def service(tmp_path, make_dom):
    dom = make_dom(ndisks=1)
    svc = Service(str(tmp_path / "run" / "livesnap.sock"), dom.env())
    yield svc, dom
    rc, err = svc.stop()
    assert rc == 0, err
    assert not os.path.exists(svc.sock)


def ls(dom, sock, *args, fault=None, cwd=ROOT, popen=False, pythonpath=None):
    """The ``livesnap`` program (``python -m livesnap``), through the service at ``sock``
    (``off``: in its own process)."""
    env = dict(dom.env(), LIVESNAP_SERVICE=sock)
    if fault:
        env["LIVESNAP_FAULT"] = fault
    # this checkout's livesnap, whatever the working directory (a service serves only
    # callers that run its own code)
    env["PYTHONPATH"] = pythonpath or ROOT
    cmd = [sys.executable, "-m", "livesnap"] + [str(a) for a in args]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=120)


def _wait_child(svc, timeout=30):
    end = time.monotonic() + timeout
    while not svc.commands():
        assert time.monotonic() < end, "no command started in the service"
        time.sleep(0.01)
    (pid,) = svc.commands()
    return pid


def _wait_spare(svc, timeout=30):
    end = time.monotonic() + timeout
    while len(svc.spares()) != 1:
        assert time.monotonic() < end, "no spare process: %s" % svc.children()
        time.sleep(0.01)
    return svc.spares()[0]


def test_commands_through_the_service_answer_as_in_their_own_process(service):
    svc, dom = service
    for args in (["snapshot-create", dom.name, "s1", "--json"],
                 ["snapshot-create", dom.name, "s2", "--json"]):
        p = ls(dom, svc.sock, *args)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["snapshot"] == args[2]
    for args, rc in ((["snapshot-list", dom.name, "--json"], 0),
                     (["snapshot-list", dom.name, "--tree"], 0),
                     (["snapshot-list", "no-such-domain-xyz"], 1),
                     (["snapshot-create", dom.name, "a/b"], 2),
                     (["snapshot-create", dom.name, "s1"], 1),
                     (["snapshot-delete", "--help"], 0),
                     (["no-such-command"], 2)):
        via, direct = ls(dom, svc.sock, *args), ls(dom, "off", *args)
        assert (via.returncode, via.stdout, via.stderr) == \
            (direct.returncode, direct.stdout, direct.stderr), args
        assert via.returncode == rc, (args, via.stderr)
    assert [s["name"] for s in json.loads(ls(dom, svc.sock, "snapshot-list", dom.name,
                                             "--json").stdout)["snapshots"]] == ["s1", "s2"]
    p = ls(dom, svc.sock, "snapshot-delete", dom.name, "s1", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["action"] in ("merged", "deleted")
    assert svc.commands() == []                  # every command's process has ended


def test_the_command_runs_in_a_service_child_on_the_callers_streams_and_cwd(service, tmp_path):
    svc, dom = service
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    p = ls(dom, svc.sock, "snapshot-create", dom.name, "s1", "--json",
           fault="create:before:0:sleep=2", cwd=str(cwd), popen=True)
    child = _wait_child(svc)
    assert os.readlink("/proc/%d/cwd" % child) == str(cwd)
    for fd in (1, 2):                            # the caller's own pipes, not copies
        assert os.readlink("/proc/%d/fd/%d" % (child, fd)) == \
            os.readlink("/proc/%d/fd/%d" % (p.pid, fd))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert json.loads(out)["snapshot"] == "s1"


def test_a_command_killed_in_the_service_dies_the_same_way_and_recovers(service):
    svc, dom = service
    p = ls(dom, svc.sock, "snapshot-create", dom.name, "s1", fault="create:after:0")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert svc.proc.poll() is None               # the service goes on
    p = ls(dom, svc.sock, "snapshot-create", dom.name, "s2")
    assert p.returncode == 1 and "livesnap recover" in p.stderr
    p = ls(dom, svc.sock, "recover", dom.name, "--json")
    assert p.returncode == 0, p.stderr
    names = [s["name"] for s in json.loads(ls(dom, svc.sock, "snapshot-list", dom.name,
                                              "--json").stdout)["snapshots"]]
    assert names == ["s1"]


def _reached(dom, path):
    """``dom`` whose commands create ``path`` when their fault point acts (in its stall)."""
    class At(object):
        def env(self):
            return dict(dom.env(), LIVESNAP_FAULT_REACHED=path)
    return At()


def _wait_file(path, proc, timeout=60):
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the command did not reach its fault point"
        time.sleep(0.01)


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
def test_signals_to_the_caller_reach_the_command(service, signo, tmp_path):
    """The same signal at the same point, to a command in its own process and to the
    service's client, ends both the same way."""
    svc, dom = service
    outcomes = []
    for sock, name in (("off", "a"), (svc.sock, "b")):
        mark = str(tmp_path / ("reached-" + name))
        p = ls(_reached(dom, mark), sock, "snapshot-create", dom.name, name,
               fault="create:before:0:sleep=3", popen=True)
        _wait_file(mark, p)                      # inside the sleep at the fault point
        p.send_signal(signo)
        out, err = p.communicate(timeout=60)
        listed = json.loads(ls(dom, "off", "snapshot-list", dom.name, "--json").stdout)
        outcomes.append((p.returncode, name in [s["name"] for s in listed["snapshots"]]))
        if p.returncode != 0:
            ls(dom, "off", "recover", dom.name)
    assert outcomes[0] == outcomes[1]
    assert svc.commands() == []


def test_the_domain_lock_holds_across_the_service_and_direct_commands(service, tmp_path):
    svc, dom = service
    mark = str(tmp_path / "reached")
    first = ls(_reached(dom, mark), svc.sock, "snapshot-create", dom.name, "s1",
               fault="create:before:0:sleep=6", popen=True)
    _wait_file(mark, first)                      # it holds the lock, stalled for 6 s
    for sock in (svc.sock, "off"):
        p = ls(dom, sock, "snapshot-create", dom.name, "s2")
        assert p.returncode == 1 and "another livesnap command" in p.stderr, p.stderr
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err


def test_no_service_listening_means_the_command_runs_itself(tmp_path, make_dom):
    dom = make_dom(ndisks=1)
    dead = str(tmp_path / "dead.sock")
    svc = Service(dead, dom.env())
    svc.proc.kill()                              # leaves its socket file behind
    svc.proc.wait()
    assert os.path.exists(dead)
    p = ls(dom, dead, "snapshot-create", dom.name, "s1", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["snapshot"] == "s1"
    p = ls(dom, str(tmp_path / "missing.sock"), "snapshot-list", dom.name, "--json")
    assert p.returncode == 0
    again = Service(dead, dom.env())             # a new service replaces the stale socket
    try:
        assert ls(dom, dead, "snapshot-list", dom.name).returncode == 0
    finally:
        assert again.stop()[0] == 0


def test_a_service_whose_code_changed_on_disk_steps_aside(tmp_path, make_dom):
    dom = make_dom(ndisks=1)
    copy = tmp_path / "pkg"
    shutil.copytree(os.path.join(ROOT, "livesnap"), str(copy / "livesnap"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    sock = str(tmp_path / "s.sock")
    svc = Service(sock, dom.env(), pythonpath=str(copy))
    try:
        mark = str(tmp_path / "reached")
        p = ls(_reached(dom, mark), sock, "snapshot-create", dom.name, "s1",
               fault="create:before:0:sleep=8", pythonpath=str(copy), cwd=str(copy), popen=True)
        _wait_file(mark, p)                      # running, stalled 8 s: longer than p2 below
        later = time.time() + 5
        os.utime(str(copy / "livesnap" / "cli" / "output.py"), (later, later))
        # served by this process itself: same answer, the service no longer takes commands
        p2 = ls(dom, sock, "snapshot-list", dom.name, "--json", pythonpath=str(copy), cwd=str(copy))
        assert p2.returncode == 0, p2.stderr
        assert svc.proc.poll() is None          # it waits for its running command
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert svc.proc.wait(timeout=30) == 0    # then exits, removing its socket
        assert not os.path.exists(sock)
        listed = json.loads(ls(dom, sock, "snapshot-list", dom.name, "--json",
                               pythonpath=str(copy), cwd=str(copy)).stdout)
        assert [s["name"] for s in listed["snapshots"]] == ["s1"]
    finally:
        svc.stop()


def test_install_service_writes_socket_activated_units(tmp_path, make_dom):
    dom = make_dom(ndisks=1)
    units = tmp_path / "units"
    sock = str(tmp_path / "run" / "livesnap.sock")
    p = ls(dom, "off", "install-service", "--unit-dir", str(units), "--socket", sock, "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert sorted(os.path.basename(x) for x in r["installed"]) == ["livesnap.service",
                                                                   "livesnap.socket"]
    socket_unit = (units / "livesnap.socket").read_text()
    service_unit = (units / "livesnap.service").read_text()
    assert "ListenStream=%s\n" % sock in socket_unit and "SocketMode=0600\n" in socket_unit
    assert "ExecStart=%s -m livesnap service\n" % sys.executable in service_unit
    assert "Environment=PYTHONPATH=%s\n" % ROOT in service_unit
    assert "Environment=LIVESNAP_STATE_DIR=%s\n" % dom.state_dir in service_unit
    assert oct(os.stat(str(units / "livesnap.socket")).st_mode & 0o777) == "0o644"
    # socket activation as systemd does it (LISTEN_FDS, fd 3): the service is started by
    # the first command and serves it
    activator = subprocess.Popen(
        ["systemd-socket-activate", "-l", sock, "-E", "PYTHONPATH=" + ROOT,
         sys.executable, "-m", "livesnap", "service"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 30
        while not os.path.exists(sock):
            assert activator.poll() is None and time.monotonic() < end, activator.communicate()
            time.sleep(0.02)
        p = ls(dom, sock, "snapshot-create", dom.name, "s1", "--json",
               fault="create:before:0:sleep=1", popen=True)
        end = time.monotonic() + 30
        served = []
        while p.poll() is None:
            served += _commands_of(activator.pid)
            time.sleep(0.05)
        out, err = p.communicate()
        assert p.returncode == 0 and json.loads(out)["snapshot"] == "s1", err
        # the activator exec'd the service in its own process, which forked the command
        with open("/proc/%d/cmdline" % activator.pid, "rb") as f:
            assert f.read().split(b"\0")[1:4] == [b"-m", b"livesnap", b"service"]
        assert served, "the command did not run in the socket-activated service"
    finally:
        activator.terminate()
        activator.communicate(timeout=30)
    p = ls(dom, "off", "install-service", "--unit-dir", str(units), "--uninstall")
    assert p.returncode == 0 and not os.listdir(str(units))


def _commands_of(ppid):
    """Children of ``ppid`` whose standard output is not ``ppid``'s own: running a command
    on its caller's streams (a spare process still has the service's)."""
    try:
        mine = os.readlink("/proc/%d/fd/1" % ppid)
    except OSError:
        return []
    out = []
    for pid in _children_of(ppid):
        try:
            if os.readlink("/proc/%d/fd/1" % pid) != mine:
                out.append(pid)
        except OSError:
            pass
    return out


def _children_of(ppid):
    out = []
    for n in os.listdir("/proc"):
        if n.isdigit():
            try:
                with open("/proc/%s/stat" % n) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == ppid:
                out.append(int(n))
    return out


def test_a_service_killed_under_a_running_command_leaves_it_to_finish(tmp_path, make_dom):
    """The command goes on without the service; its caller returns only once it has ended,
    with the command's own exit status and output (the command answers its caller itself),
    and the domain is consistent and unlocked."""
    dom = make_dom(ndisks=1)
    svc = Service(str(tmp_path / "s.sock"), dom.env())
    p = ls(dom, svc.sock, "snapshot-create", dom.name, "s1", fault="create:before:0:sleep=2",
           popen=True)
    child = _wait_child(svc)
    svc.proc.kill()
    svc.proc.wait()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "snapshot s1 created" in out, (out, err)
    # it answered once done (output written, domain unlocked); then it ends
    deadline = time.monotonic() + 10
    while os.path.exists("/proc/%d" % child) and time.monotonic() < deadline:
        try:
            if open("/proc/%d/stat" % child).read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except OSError:
            break
        time.sleep(0.01)
    else:
        assert not os.path.exists("/proc/%d" % child), "command process still running"
    listed = json.loads(ls(dom, "off", "snapshot-list", dom.name, "--json").stdout)
    assert [s["name"] for s in listed["snapshots"]] == ["s1"]
    assert ls(dom, "off", "snapshot-create", dom.name, "s2").returncode == 0


def test_a_second_service_on_the_same_socket_is_refused(service):
    svc, dom = service
    p = subprocess.run([sys.executable, "-m", "livesnap", "service", "--socket", svc.sock],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=60)
    assert p.returncode == 1 and p.stderr == \
        "error: cannot serve on %s: a livesnap service already listens there\n" % svc.sock, \
        p.stderr
    assert ls(dom, svc.sock, "snapshot-list", dom.name).returncode == 0     # still served
    blocked = os.path.join(os.path.dirname(svc.sock), "file")
    open(blocked, "w").close()
    p = subprocess.run([sys.executable, "-m", "livesnap", "service", "--socket",
                        os.path.join(blocked, "s.sock")], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("error: cannot serve on "), p.stderr


def test_the_next_command_runs_in_a_process_forked_ahead(service):
    """The service forks the next command's process while idle (a spare); a command runs in
    it, a new spare is forked; a spare that died is replaced; none outlives the service."""
    svc, dom = service
    spare = _wait_spare(svc)
    p = ls(dom, svc.sock, "snapshot-create", dom.name, "s1", "--json",
           fault="create:before:0:sleep=1", popen=True)
    assert _wait_child(svc) == spare
    following = _wait_spare(svc)                 # forked while the command runs
    assert following != spare
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and json.loads(out)["snapshot"] == "s1", err
    os.kill(following, signal.SIGKILL)
    p = ls(dom, svc.sock, "snapshot-list", dom.name, "--json")
    assert p.returncode == 0, p.stderr
    assert [s["name"] for s in json.loads(p.stdout)["snapshots"]] == ["s1"]
    last = _wait_spare(svc)
    assert last not in (spare, following)
    rc, err = svc.stop()
    assert rc == 0, err
    end = time.monotonic() + 10
    while os.path.exists("/proc/%d" % last) and time.monotonic() < end:
        with open("/proc/%d/stat" % last) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    else:
        assert not os.path.exists("/proc/%d" % last), "the spare outlived the service"


def test_a_request_larger_than_a_socket_buffer_arrives_whole(service):
    """An environment of ~360 KiB (more than one message over a Unix socket carries) reaches
    the command whole: the last variable, the state directory, still counts."""
    svc, dom = service
    ls(dom, svc.sock, "snapshot-create", dom.name, "s1")
    env = dict(dom.env(), LIVESNAP_SERVICE=svc.sock)
    big = {"LIVESNAP_TEST_PAD%d" % i: "x" * (120 * 1024) for i in range(3)}
    state = env.pop("LIVESNAP_STATE_DIR")
    env.update(big)
    env["LIVESNAP_STATE_DIR"] = state                # after the padding
    p = subprocess.run([sys.executable, "-m", "livesnap", "snapshot-list", dom.name, "--json"],
                       env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [s["name"] for s in json.loads(p.stdout)["snapshots"]] == ["s1"]
    assert len(svc.commands()) == 0 and svc.proc.poll() is None
