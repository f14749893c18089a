#!/usr/bin/env python3
"""livesnap's libvirt qemu hook, for ``/etc/libvirt/hooks/qemu.d/livesnap`` (libvirt >= 6.5).

libvirt runs it as ``livesnap <domain name> <operation> <sub-op> <extra>`` with the domain
XML on stdin, synchronously, with a minimal environment:

* ``prepare``: refuse (exit 1, one line on stderr naming ``livesnap recover``) to start a
  domain whose catalog holds an interrupted operation that needs the domain shut off (any
  datapath but ``libvirt-live``);
* ``release``: when hidden nodes are down to one child (or none) and nothing is
  interrupted, start ``livesnap reclaim`` detached (own session, stdio on /dev/null, not
  waited for; its output goes to ``<state dir>/<uuid>.reclaim.log``) and return at once;
* anything else: exit 0.

It never calls libvirt (a hook that does deadlocks the daemon), never creates or writes a
catalog (read-only open, short busy timeout) and logs to syslog (ident ``livesnap-hook``).
Whatever goes wrong inside it is logged and the operation allowed: a broken livesnap must
not keep every domain from starting.

This file is self-contained (Python 3.6, stdlib only): ``livesnap install-hooks`` copies it
with the values below baked in (the lines ending in ``livesnap-install``); unbaked, they
come from the environment and this interpreter.
"""
import json
import os
import re
import sqlite3
import subprocess
import sys
import syslog
import time
import urllib.parse
import xml.etree.ElementTree as ET

STATE_DIR = None   # livesnap-install: STATE_DIR
PYTHON = None      # livesnap-install: PYTHON
PYTHONPATH = None  # livesnap-install: PYTHONPATH
URI = None         # livesnap-install: URI

DEFAULT_STATE_DIR = "/var/lib/livesnap"
DEFAULT_URI = "qemu:///system"
LIVE_DATAPATHS = ("libvirt-live",)   # operations journaled on a running domain
BUSY_TIMEOUT = 0.3                   # seconds to wait for a catalog writer, at most
IDENT = "livesnap-hook"
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")   # libvirt's form


def log(priority, msg):
    try:
        syslog.openlog(IDENT, syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(priority, msg)
    except Exception:   # no syslog socket: the hook still does its job
        pass


def config():
    """(state dir, python, PYTHONPATH for livesnap or None, libvirt URI)."""
    state_dir = STATE_DIR or os.environ.get("LIVESNAP_STATE_DIR") or DEFAULT_STATE_DIR
    pythonpath = PYTHONPATH
    if pythonpath is None and __name__ != "__main__":
        # imported as livesnap.hook (the repository's launcher): livesnap lives beside us
        pythonpath = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return state_dir, PYTHON or sys.executable, pythonpath, URI or DEFAULT_URI


def domain_uuid(xml_text):
    if not xml_text.strip():
        return None
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        return None
    uuid = (root.findtext("uuid") or "").strip()
    return uuid if UUID_RE.match(uuid) else None


class Catalog(object):
    """What the hook needs from a domain's catalog, read-only; None when there is none."""

    def __init__(self, path):
        self.path = path
        self.db = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(path), uri=True,
                                  timeout=BUSY_TIMEOUT)

    @classmethod
    def open(cls, state_dir, uuid):
        path = os.path.join(state_dir, uuid + ".db")
        if not os.path.isfile(path):
            return None
        return cls(path)

    def _tables(self):
        return {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def interrupted(self):
        """(id, op, datapath) of the first interrupted operation, or None."""
        if "operations" not in self._tables():
            return None
        row = self.db.execute("SELECT id, op, plan FROM operations WHERE status IN "
                              "('running', 'failed') ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return None
        try:
            datapath = (json.loads(row[2]).get("result") or {}).get("datapath")
        except (ValueError, AttributeError):
            datapath = None
        return row[0], row[1], datapath

    def reclaimable(self):
        """Ids of hidden nodes with fewer than two children."""
        if "nodes" not in self._tables():
            return []
        return [r[0] for r in self.db.execute(
            "SELECT n.id FROM nodes n WHERE n.state = 'hidden' AND "
            "(SELECT COUNT(*) FROM nodes c WHERE c.parent = n.id) < 2 ORDER BY n.id")]

    def close(self):
        self.db.close()


def on_prepare(name, cat):
    op = cat.interrupted()
    if op is None:
        return 0
    op_id, op_name, datapath = op
    if datapath in LIVE_DATAPATHS:
        log(syslog.LOG_INFO, "%s: operation #%d (%s) is unfinished but was journaled on the "
                             "running domain (%s): start allowed"
            % (name, op_id, op_name, datapath))
        return 0
    msg = ("livesnap: operation #%d (%s) on '%s' was interrupted and needs the domain shut off: "
           "run 'livesnap recover %s' before starting it" % (op_id, op_name, name, name))
    log(syslog.LOG_WARNING, "refused to start %s: %s" % (name, msg))
    sys.stderr.write(msg + "\n")
    return 1


def on_release(name, uuid, cat):
    op = cat.interrupted()
    if op is not None:
        log(syslog.LOG_INFO, "%s: operation #%d (%s) is unfinished: no reclaim until "
                             "'livesnap recover %s'" % (name, op[0], op[1], name))
        return 0
    nodes = cat.reclaimable()
    if not nodes:
        return 0
    cat.close()     # not inherited by the reclaim
    pid = spawn_reclaim(name, uuid)
    log(syslog.LOG_INFO, "%s: hidden node(s) %s reclaimable: started 'livesnap reclaim' "
                         "(pid %d), detached" % (name, ", ".join(nodes), pid))
    return 0


def reclaim_argv(uuid):
    state_dir, python, _, uri = config()
    return [python, "-m", "livesnap.cli.main", "reclaim", uuid, "--state-dir", state_dir,
            "-c", uri]


def spawn_reclaim(name, uuid):
    """Fork a process outside the hook (own session, stdio on /dev/null, so libvirtd is not
    left waiting for our pipes) that runs the reclaim, appends its output to
    ``<state dir>/<uuid>.reclaim.log`` and logs its outcome; returns its pid."""
    state_dir, _, pythonpath, _ = config()
    argv = reclaim_argv(uuid)
    pid = os.fork()
    if pid:
        return pid
    try:   # the child: never returns
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        env = {"PATH": os.environ.get("PATH") or "/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8"}
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        try:
            logfd = os.open(os.path.join(state_dir, uuid + ".reclaim.log"),
                            os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError:
            logfd = null
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        proc = subprocess.Popen(argv, stdin=null, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd="/",
                                universal_newlines=True)
        out = proc.communicate()[0]
        os.write(logfd, ("%s %s: %s\n%sexit %d\n" % (started, name, " ".join(argv), out,
                                                     proc.returncode)).encode())
        last = " | ".join(out.strip().splitlines()[-3:])
        log(syslog.LOG_INFO if proc.returncode == 0 else syslog.LOG_ERR,
            "%s: %s exited %d: %s" % (name, " ".join(argv[3:5]), proc.returncode, last))
        os._exit(0)
    except BaseException as e:
        log(syslog.LOG_ERR, "%s: reclaim failed to run: %s" % (name, e))
        os._exit(1)


def main(argv=None, stdin=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        sys.stderr.write("usage: livesnap-hook DOMAIN OPERATION [SUB-OP [EXTRA]] < domain.xml\n")
        return 2
    name, op = argv[0], argv[1]
    if op not in ("prepare", "release"):
        return 0
    stdin = sys.stdin if stdin is None else stdin
    try:
        uuid = domain_uuid(stdin.read())
        if uuid is None:
            log(syslog.LOG_WARNING, "%s %s: no domain UUID on stdin: nothing to do" % (name, op))
            return 0
        state_dir = config()[0]
        cat = Catalog.open(state_dir, uuid)
        if cat is None:
            return 0
        try:
            if op == "prepare":
                return on_prepare(name, cat)
            return on_release(name, uuid, cat)
        finally:
            cat.close()
    except Exception as e:
        log(syslog.LOG_ERR, "%s %s: %s: %s (allowed)" % (name, op, type(e).__name__, e))
        return 0


if __name__ == "__main__":
    sys.exit(main())
