"""A ``tap-ctl``-compatible command for the tapdisk stand-in (``testxen/tap-ctl``).

Used by nothing any more: the benchmark (bench/xen.py) and the tests run the real tap-ctl
(testxen/blktap.py).
It follows blktap's control/tap-ctl.c: list's non-tty format, pause -t failing with EINVAL,
exit codes as positive errnos.

Verbs (options as blktap's tap-ctl; exit 0 or a positive errno, as ``tap-ctl`` does)::

    create -a vhd:PATH [-R]            spawn a tapdisk stand-in, allocate a minor, open PATH;
                                       prints /dev/xen/blktap-2/tapdev<minor>
    list [-p PID] [-m MINOR] [-t TYPE] [-f PATH]
                                       pid=<dec> minor=<dec> state=<%#x> args=vhd:<path>
    pause -p PID -m MINOR              (-t TIMEOUT fails with EINVAL, as upstream)
    unpause -p PID -m MINOR [-a vhd:PATH]
    close -p PID -m MINOR / destroy -p PID -m MINOR   pause, then the tapdisk exits

The registry of running tapdisks is ``$TESTXEN_RUN_DIR`` (default /run/testxen): per tapdisk a
``tapdisk<pid>.<minor>.json`` entry, a control socket, an ack log and a stderr log. Writer
settings for ``create`` come from the environment: TESTXEN_WRITER_INTERVAL (s),
TESTXEN_SLOTS, TESTXEN_STRIDE (bytes), TESTXEN_RETRIES, TESTXEN_RETRY_INTERVAL (s),
TESTXEN_MAX_LIFETIME (s, 0 = forever).
"""
import errno
import fcntl
import getopt
import glob
import json
import os
import subprocess
import sys
import time

from testxen.tapdisk import DEFAULT_RUN_DIR, request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = "/dev/xen/blktap-2/tapdev%d"


def run_dir():
    return os.environ.get("TESTXEN_RUN_DIR") or DEFAULT_RUN_DIR


class Fail(Exception):
    def __init__(self, code, text):
        Exception.__init__(self, text)
        self.code = code


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                      # a zombie (exited, not reaped) is not alive
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def registry():
    """The registry entries of live tapdisks (stale entries are removed)."""
    out = []
    for p in sorted(glob.glob(os.path.join(run_dir(), "tapdisk*.json"))):
        try:
            with open(p) as f:
                entry = json.load(f)
        except (OSError, ValueError):
            continue
        if not _alive(entry["pid"]):
            for q in (p, entry.get("sock")):
                try:
                    os.unlink(q)
                except (OSError, TypeError):
                    pass
            continue
        out.append(entry)
    return out


def _entry(pid, minor):
    for e in registry():
        if e["pid"] == pid and e["minor"] == minor:
            return e
    raise Fail(errno.ENOENT, "no tapdisk with pid %d minor %d" % (pid, minor))


def _call(entry, req, timeout=None):
    try:
        reply = request(entry["sock"], req, timeout=timeout)
    except OSError as e:
        raise Fail(e.errno or errno.EPROTO, "tapdisk %d: %s" % (entry["pid"], e))
    if reply.get("rc"):
        raise Fail(reply["rc"], "%s failed: %s" % (req["cmd"], reply.get("error")))
    return reply


def _opts(args, spec):
    try:
        opts, rest = getopt.getopt(args, spec)
    except getopt.GetoptError as e:
        raise Fail(errno.EINVAL, "usage: %s" % e)
    if rest:
        raise Fail(errno.EINVAL, "usage: unexpected %s" % rest)
    return dict(opts)


def _pid_minor(o):
    if "-p" not in o or "-m" not in o:
        raise Fail(errno.EINVAL, "usage: -p PID -m MINOR required")
    try:
        return int(o["-p"]), int(o["-m"])
    except ValueError:
        raise Fail(errno.EINVAL, "usage: bad pid/minor")


def cmd_list(args):
    o = _opts(args, "p:m:t:f:h")
    pid = int(o["-p"]) if "-p" in o else None
    minor = int(o["-m"]) if "-m" in o else None
    path = os.path.abspath(o["-f"]) if "-f" in o else None
    for e in registry():
        if pid is not None and e["pid"] != pid or minor is not None and e["minor"] != minor:
            continue
        try:
            st = request(e["sock"], {"cmd": "status"}, timeout=10)
        except (OSError, ValueError):
            st = None
        if st is None:
            print("pid=%d minor=%d" % (e["pid"], e["minor"]))
            continue
        if path is not None and os.path.normpath(st["path"]) != os.path.normpath(path):
            continue
        if "-t" in o and st["type"] != o["-t"]:
            continue
        # C's "%#x" prints 0 as "0" (Python's prints "0x0")
        state = "%#x" % st["state"] if st["state"] else "0"
        print("pid=%d minor=%d state=%s args=%s:%s" % (st["pid"], st["minor"], state,
                                                      st["type"], st["path"]))
    return 0


def _lock():
    d = run_dir()
    os.makedirs(d, exist_ok=True)
    fd = os.open(os.path.join(d, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def cmd_create(args):
    o = _opts(args, "a:Rd:h")
    if "-a" not in o:
        raise Fail(errno.EINVAL, "usage: create <-a type:/path/to/file> [-R readonly]")
    typ, sep, path = o["-a"].partition(":")
    if not sep or typ != "vhd":
        raise Fail(errno.EINVAL, "unsupported type %r (only vhd)" % typ)
    if "-R" in o:
        raise Fail(errno.EOPNOTSUPP, "read-only tapdisks are not emulated")
    path = os.path.abspath(path)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    lock = _lock()
    try:
        used = {e["minor"] for e in registry()}
        minor = next(m for m in range(len(used) + 1) if m not in used)
        argv = [sys.executable, "-m", "testxen.tapdisk", "--path", path, "--minor", str(minor),
                "--run-dir", run_dir()]
        for var, opt in (("TESTXEN_WRITER_INTERVAL", "--interval"), ("TESTXEN_SLOTS", "--slots"),
                         ("TESTXEN_STRIDE", "--stride"), ("TESTXEN_RETRIES", "--retries"),
                         ("TESTXEN_RETRY_INTERVAL", "--retry-interval"),
                         ("TESTXEN_MAX_LIFETIME", "--max-lifetime")):
            if os.environ.get(var):
                argv += [opt, os.environ[var]]
        log = open(os.path.join(run_dir(), "tapdisk-minor%d.log" % minor), "ab")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=log, env=env, cwd="/", start_new_session=True)
        finally:
            log.close()
        line = proc.stdout.readline().decode().strip()
        proc.stdout.close()
    finally:
        os.close(lock)
    if not line.startswith("OK "):
        proc.wait()
        parts = line.split(" ", 2)
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else errno.EIO
        raise Fail(code, "tapdisk failed to open %s: %s" % (path, line or "no answer"))
    print(DEV % minor)
    return 0


def cmd_pause(args):
    if "-t" in [a[:2] for a in args]:
        # blktap control/tap-ctl.c: case 't' falls through into 'goto usage'
        raise Fail(errno.EINVAL, "usage: pause <-p pid> <-m minor>")
    pid, minor = _pid_minor(_opts(args, "p:m:h"))
    _call(_entry(pid, minor), {"cmd": "pause"})
    return 0


def cmd_unpause(args):
    o = _opts(args, "p:m:a:2:c:h")
    pid, minor = _pid_minor(o)
    req = {"cmd": "unpause"}
    if "-a" in o:
        req["args"] = o["-a"]
    _call(_entry(pid, minor), req)
    return 0


def cmd_close(args):
    o = _opts(args, "p:m:ft:h")
    pid, minor = _pid_minor(o)
    _call(_entry(pid, minor), {"cmd": "close"})
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if _alive(pid):
        raise Fail(errno.ETIMEDOUT, "tapdisk %d did not exit" % pid)
    return 0


COMMANDS = {"list": cmd_list, "create": cmd_create, "pause": cmd_pause,
            "unpause": cmd_unpause, "close": cmd_close, "destroy": cmd_close}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        sys.stdout.write("usage: tap-ctl COMMAND [OPTIONS]\nCOMMAND := { %s }\n"
                         % " | ".join(sorted(COMMANDS)))
        return 0 if not argv else errno.EINVAL
    try:
        return COMMANDS[argv[0]](argv[1:])
    except Fail as e:
        sys.stderr.write("tap-ctl %s: %s\n" % (argv[0], e))
        return e.code


def alive(pid):
    """The process exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_all(run_dir=None, pids=(), timeout=10.0):
    """SIGKILL every stand-in tapdisk registered under ``run_dir`` and ``pids``; wait until
    they are gone. Returns the pids still alive after ``timeout`` (should be none)."""
    import signal
    pids = set(pids)
    if run_dir:
        for p in glob.glob(os.path.join(run_dir, "tapdisk*.json")):
            try:
                with open(p) as f:
                    pids.add(json.load(f)["pid"])
            except (OSError, ValueError, KeyError):
                pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [p for p in pids if alive(p)]
