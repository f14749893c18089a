"""The ``livesnap`` client and the service's connections: the client hands nothing to a
socket served by another user; a caller the service refuses, or that reaches a service
that is stopping, is answered and runs its command itself (never ECONNRESET and a
traceback); a caller that stalls holds up no other command."""
import array
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile

import pytest

import livesnap
from livesnap import wire
from livesnap.cli import client
from livesnap.service import wait_listening
from test_service import ROOT, Service, _wait_child

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs processes as other users")

NOBODY = 65534
OTHER = 65533

# a listener that records what a client sends it: the bytes and descriptors of its first
# message, one line per connection on the report pipe
LISTENER = r"""
import array, os, socket, sys
path, report = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
os.umask(0)                     # anyone may connect
s.bind(path)
s.listen(8)
os.write(report, b"ready\n")
while True:
    c, _ = s.accept()
    fds = array.array("i")
    data, anc, _, _ = c.recvmsg(1 << 20, socket.CMSG_SPACE(64 * fds.itemsize))
    for level, kind, payload in anc:
        fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    for fd in fds:
        os.close(fd)
    c.close()
    os.write(report, b"%d %d\n" % (len(data), len(fds)))
"""


@pytest.fixture
def public_dir():
    """A directory under /tmp that other users can reach (tmp_path's parents are 0700)."""
    d = tempfile.mkdtemp(prefix="livesnap-client-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Listener(object):
    def __init__(self, directory, uid):
        os.chown(directory, uid, uid)
        self.path = os.path.join(directory, "s.sock")
        r, w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-c", LISTENER, self.path, str(w)],
                                     pass_fds=(w,), user=uid, group=uid, extra_groups=[])
        os.close(w)
        self.report = os.fdopen(r)
        assert self.report.readline() == "ready\n"

    def received(self):
        """(bytes, descriptors) of the next connection's first message."""
        import select
        assert select.select([self.report], [], [], 120)[0], "no connection reached it"
        n, fds = self.report.readline().split()
        return int(n), int(fds)

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.report.close()


def run(env, *args, user=None):
    kw = dict(user=user, group=user, extra_groups=[]) if user is not None else {}
    return subprocess.run([sys.executable, "-m", "livesnap"] + [str(a) for a in args],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=120, **kw)


def warned(p, uid):
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("livesnap: not using the "
                                                             "service at "), p.stderr
    assert "uid %d" % uid in p.stderr, p.stderr


def test_root_sends_nothing_to_another_users_socket(make_dom, public_dir):
    """The issue's case: root's command, LIVESNAP_SERVICE pointing at uid 65534's socket:
    nothing reaches it (no request, no descriptors), the command runs in root's process."""
    dom = make_dom(ndisks=1)
    listener = Listener(public_dir, NOBODY)
    try:
        env = dict(dom.env(), LIVESNAP_SERVICE=listener.path, SECRET_OF_ROOT="x")
        p = run(env, "snapshot-create", dom.name, "s1", "--json")
        assert p.returncode == 0 and json.loads(p.stdout)["snapshot"] == "s1", p.stderr
        warned(p, NOBODY)
        assert listener.received() == (0, 0)
        p = run(env, "snapshot-list", dom.name, "--json")
        assert [s["name"] for s in json.loads(p.stdout)["snapshots"]] == ["s1"]
        assert listener.received() == (0, 0)
    finally:
        listener.stop()


def test_a_user_sends_nothing_to_a_third_users_socket_but_does_to_its_own(public_dir):
    """Variants: uid 65534's command and uid 65533's socket: refused the same way; and its
    own uid's socket: that one is used (the listener gets the request and the three
    streams, closes without an answer, and the command then runs in the caller's process)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    for uid, sent in ((OTHER, False), (NOBODY, True)):
        d = tempfile.mkdtemp(dir=public_dir)
        os.chmod(d, 0o755)
        listener = Listener(d, uid)
        try:
            p = run(dict(env, LIVESNAP_SERVICE=listener.path), "--version", user=NOBODY)
            assert p.returncode == 0 and p.stdout == "livesnap %s\n" % livesnap.__version__
            n, fds = listener.received()
            if sent:
                assert n > 0 and fds == 3 and p.stderr == ""
            else:
                assert (n, fds) == (0, 0)
                warned(p, OTHER)
        finally:
            listener.stop()


def test_the_peer_check_is_made_before_anything_is_sent(public_dir):
    """client.via_service itself, in this (root's) process: None (run it here), nothing sent."""
    listener = Listener(public_dir, NOBODY)
    try:
        err = tempfile.TemporaryFile(mode="w+")
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            assert client.via_service(["snapshot-list", "x"], listener.path) is None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        assert listener.received() == (0, 0)
    finally:
        listener.stop()


def _start_service(sock, env, *extra, user=None):
    kw = dict(user=user, group=user, extra_groups=[]) if user is not None else {}
    proc = subprocess.Popen([sys.executable, "-m", "livesnap", "service", "--socket", sock]
                            + list(extra), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)
    if not wait_listening(sock, proc, timeout=60):
        proc.kill()
        raise AssertionError("the service did not listen: %s" % (proc.communicate(),))
    return proc


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err


def _request(argv=("--version",), environ=None):
    return wire.encode_request(list(argv), ROOT, dict(environ or os.environ, PYTHONPATH=ROOT))


def _send(sock, request):
    null = os.open(os.devnull, os.O_RDWR)
    try:
        sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  struct.pack("3i", null, null, null))])
    finally:
        os.close(null)


def _first_line(sock):
    """The service's first answer line, as the client reads it (b"...<ECONNRESET>" when
    the connection was reset instead)."""
    out = b""
    while not out.endswith(b"\n"):
        try:
            more = sock.recv(1)
        except ConnectionResetError:
            return out + b"<ECONNRESET>"
        if not more:
            return out
        out += more
    return out


REFUSED_CALLER = r"""
import os, socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
null = os.open(os.devnull, os.O_RDWR)
request = sys.stdin.buffer.read(int(sys.argv[2]))
sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", null, null, null))])
print("sent", flush=True)
sys.stdin.readline()
out = b""
while not out.endswith(b"\n"):           # the first line, as the client reads it
    try:
        more = sock.recv(1)
    except ConnectionResetError:
        out += b"<ECONNRESET>"
        break
    if not more:
        break
    out += more
print(out.decode())
"""


def test_a_refused_caller_whose_request_is_sent_reads_an_answer_not_a_reset(public_dir):
    """The ~1 in 10 ECONNRESET: the service refused a caller of another uid by closing the
    connection with the caller's request unread in it, which resets the caller's end. The
    race made certain: the service stopped until the request is sent."""
    sock = os.path.join(public_dir, "s.sock")
    svc = _start_service(sock, dict(os.environ, PYTHONPATH=ROOT))
    try:
        os.chmod(sock, 0o666)                     # as an administrator might
        request = _request()
        svc.send_signal(signal.SIGSTOP)
        caller = subprocess.Popen([sys.executable, "-c", REFUSED_CALLER, sock, str(len(request))],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False,
                                  user=NOBODY, group=NOBODY, extra_groups=[])
        caller.stdin.write(request)
        caller.stdin.flush()
        assert caller.stdout.readline() == b"sent\n"
        svc.send_signal(signal.SIGCONT)
        caller.stdin.write(b"go\n")
        caller.stdin.close()
        out = caller.stdout.read()
        caller.wait()
        assert out == b"fallback refused\n\n", out
    finally:
        rc, err = _stop(svc)
    assert rc == 0, err


def test_non_root_callers_of_a_root_service_run_their_commands_cleanly(public_dir):
    """The real client, many at once: the service refuses each (not its uid), each runs its
    command itself, no traceback."""
    sock = os.path.join(public_dir, "s.sock")
    svc = _start_service(sock, dict(os.environ, PYTHONPATH=ROOT))
    try:
        os.chmod(sock, 0o666)
        env = dict(os.environ, PYTHONPATH=ROOT, LIVESNAP_SERVICE=sock)
        callers = [subprocess.Popen([sys.executable, "-m", "livesnap", "--version"], env=env,
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, user=NOBODY, group=NOBODY, extra_groups=[])
                   for _ in range(20)]
        for c in callers:
            out, err = c.communicate(timeout=120)
            assert (c.returncode, out, err) == (0, "livesnap %s\n" % livesnap.__version__, "")
    finally:
        rc, err = _stop(svc)
    assert rc == 0, err


def test_a_caller_queued_when_the_service_stops_is_answered(tmp_path):
    """Connected, not yet accepted, when the service stops: told "fallback" (and its
    command runs in its own process), not reset by the listener's close."""
    sock = str(tmp_path / "s.sock")
    svc = _start_service(sock, dict(os.environ, PYTHONPATH=ROOT))
    try:
        svc.send_signal(signal.SIGSTOP)
        queued = []
        for i in range(3):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(sock)
            if i:
                _send(c, _request())
            queued.append(c)
        svc.send_signal(signal.SIGTERM)
        svc.send_signal(signal.SIGCONT)
        for c in queued:
            assert _first_line(c) == b"fallback stopping\n"
            c.close()
        _, err = svc.communicate(timeout=60)      # already told to stop
        assert svc.returncode == 0, err
    finally:
        if svc.poll() is None:
            _stop(svc)
    assert not os.path.exists(sock)


def test_a_stalled_caller_holds_up_no_other_command(make_dom, tmp_path):
    """Two callers connect and stall (one sends nothing, one half its request); meanwhile
    other commands are served at once; then the half request is finished and served too.
    (A long --request-timeout: nothing here depends on how fast the machine is.)"""
    dom = make_dom(ndisks=1)
    sock = str(tmp_path / "s.sock")
    svc = _start_service(sock, dom.env(), "--request-timeout", "3600")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(sock)
        half.connect(sock)
        request = _request()
        _send(half, request[:len(request) // 2])
        env = dict(dom.env(), LIVESNAP_SERVICE=sock)
        p = subprocess.Popen([sys.executable, "-m", "livesnap", "snapshot-create", dom.name,
                              "s1", "--json"], env=dict(env, LIVESNAP_FAULT="create:before:0:sleep=1"),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wrapper = Service.__new__(Service)
        wrapper.proc = svc
        _wait_child(wrapper)                      # run by the service, not by the caller
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and json.loads(out)["snapshot"] == "s1", err
        for args in (["snapshot-list", dom.name, "--json"], ["--version"]):
            q = run(env, *args)
            assert q.returncode == 0 and q.stderr == "", q.stderr
        # the stalled callers are still waited for
        for c in (silent, half):
            c.setblocking(False)
            with pytest.raises(BlockingIOError):
                c.recv(1)
            c.setblocking(True)
        half.sendall(request[len(request) // 2:])
        assert _replies_until_exit(half) == "exit 0"
    finally:
        silent.close()
        half.close()
        rc, err = _stop(svc)
    assert rc == 0, err


def _replies_until_exit(sock):
    buf = b""
    while b"exit " not in buf:
        more = sock.recv(4096)
        assert more, buf
        buf += more
    # (the command answers "exit N" itself: it may come before the service's "pid N")
    lines = buf.decode().splitlines()
    assert all(line.split()[0] in ("pid", "exit") for line in lines), lines
    return [line for line in lines if line.startswith("exit ")][0]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "x"])
def test_a_bad_request_timeout_is_a_usage_error(value):
    p = subprocess.run([sys.executable, "-m", "livesnap", "service", "--socket", "/nonexistent/s",
                        "--request-timeout", value], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=60)
    assert p.returncode == 2 and "--request-timeout" in p.stderr, p.stderr
