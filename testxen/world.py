"""The world of one XAPI test or benchmark run (tests/xapi/conftest.py, bench/xen_sm.py): the
XAPI stand-in (``testxen/xapi.py``) on a UNIX socket, a file SR, real tapdisks (blktap,
testxen/blktap.py) with a guest writing through each over NBD, and the plugin run exactly as
xapi runs it: the plugin file itself with one argv holding the XML-RPC methodCall, its reply
read from stdout. livesnap runs the real tap-ctl and vhd-util (TAP_CTL, VHD_UTIL)."""
import json
import os
import shutil
import subprocess
import sys
import xmlrpc.client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTXEN = os.path.join(ROOT, "testxen")
PLUGIN = os.path.join(ROOT, "xapi_plugin", "livesnap")
SIZE = 8 << 20

if TESTXEN not in sys.path:
    sys.path.insert(0, TESTXEN)          # XenAPIPlugin (stand-in) for in-process imports

from testxen import blktap  # noqa: E402
from testxen.xapi import Xapi  # noqa: E402


def xenapi_lib(d):
    """``d``, a new directory holding only the ``XenAPI`` package (PyPI ``xenapi``), for the
    plugin's interpreter (dom0's /usr/bin/python3 provides it; here the venv has it)."""
    import XenAPI
    src = os.path.dirname(os.path.abspath(XenAPI.__file__))
    os.makedirs(d, exist_ok=True)
    shutil.copytree(src, os.path.join(d, "XenAPI"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return d


class World(object):
    """The world of one test: the xapi stand-in, real tapdisks, SR, state dir."""

    def __init__(self, base, xenapi_lib):
        self.base = base
        self.sr_base = os.path.join(base, "sr-mount")
        self.state_dir = os.path.join(base, "state")
        self.run_dir = os.path.join(base, "run")
        self.sm_lock_dir = os.path.join(base, "sm-lock")
        self.socket = os.path.join(base, "xapi")
        for d in (self.sr_base, self.run_dir):
            os.makedirs(d)
        self.pythonpath = os.pathsep.join([ROOT, TESTXEN, xenapi_lib])
        self.xapi = Xapi(sr_mount_base=self.sr_base)
        self.xapi.plugin_env = self.env()
        self.sr = self.xapi.add_sr("ext")
        os.makedirs(self.xapi.sr_dir(self.sr))
        self.xapi.serve(self.socket)
        self.session = self.xapi.login()
        self.tapdisks = blktap.Tapdisks(self.run_dir)

    def env(self, **extra):
        env = dict(os.environ)
        env.pop("LIVESNAP_FAULT", None)
        env.update({"PYTHONPATH": self.pythonpath, "TESTXEN_XAPI_SOCKET": self.socket,
                    "LIVESNAP_STATE_DIR": self.state_dir,
                    "LIVESNAP_SR_MOUNT_BASE": self.sr_base,
                    "LIVESNAP_SM_LOCK_DIR": self.sm_lock_dir,
                    # SM's IPC flags: testxen/sm.py's state directory is <base>/sm
                    "LIVESNAP_SM_IPC_DIR": os.path.join(self.base, "sm", "ipc"),
                    "TESTXEN_RUN_DIR": self.run_dir})
        env.update(blktap.env())
        env.update(extra)
        return env

    # -- the plugin, as xapi runs it ---------------------------------------------------------

    def run_plugin(self, fn, args, session=None, **env):
        """Run the plugin with one argv (the methodCall). Returns the reply struct, after
        checking that stdout is exactly one methodResponse and the exit status is 0."""
        call = xmlrpc.client.dumps((session or self.session, args), methodname=fn)
        p = subprocess.run([PLUGIN, call], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True,
                           env=self.env(**env), timeout=120)
        self.last = p
        assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
        (reply,), method = xmlrpc.client.loads(p.stdout)
        assert method is None
        assert p.stdout == xmlrpc.client.dumps((reply,), methodresponse=True,
                                               allow_none=True) + "\n", p.stdout
        return reply

    def ok(self, fn, **args):
        reply = self.run_plugin(fn, args)
        assert reply["Status"] == "Success", (reply, self.last.stderr)
        assert isinstance(reply["Value"], str)
        return json.loads(reply["Value"])

    def fail(self, fn, args, code, **env):
        reply = self.run_plugin(fn, args, **env)
        assert reply["Status"] == "Failure", reply
        desc = reply["ErrorDescription"]
        assert desc[0] == code, (desc, self.last.stderr)
        if code.startswith("LIVESNAP_"):
            assert len(desc) == 3 and all(isinstance(d, str) for d in desc), desc
            json.loads(desc[2])
        return desc

    # -- VMs ---------------------------------------------------------------------------------

    def add_lvm_sr(self, vg):
        """An LVHD SR whose volume group is the LVM stand-in's ``vg`` (VG_XenStorage-<uuid>)."""
        return self.xapi.add_sr("lvm", uuid=vg.name[len("VG_XenStorage-"):])

    def add_vm(self, name="vm1", ndisks=2, power_state="Halted", sr=None, size=SIZE,
               **fields):
        from livesnap.tools import lvm
        sr = sr or self.sr
        vm = self.xapi.add_vm(name, power_state=power_state, **fields)
        paths = {}
        for i in range(ndisks):
            vdi = self.xapi.add_vdi(sr, size)
            path = self.xapi.vdi_path(vdi)
            vg_lv = lvm.split_path(path)
            if vg_lv:
                lvm.lvcreate(vg_lv[0], vg_lv[1], lvm.full_size(size))
            blktap.create(path, size)
            self.xapi.add_vbd(vm, vdi, userdevice=str(i))
            paths["xvd" + "abcdefgh"[i]] = path
        return Vm(self, vm, paths)

    def xenapi_session(self, originator="livesnap-tests"):
        """A XenAPI session logged in over the stand-in's socket, as xe, XenCenter or the
        plugin open one (XenAPI's UDS naming: every "/" of the path as "_")."""
        import XenAPI
        s = XenAPI.Session("http://%s/" % self.socket.replace("/", "_"),
                           transport=XenAPI.UDSTransport())
        s.xenapi.login_with_password("root", "", "", originator)
        return s

    def tap_ctl(self, *args):
        return blktap.tap_ctl(*args)

    def kill_all(self):
        self.tapdisks.close()

    def snapshot_of_files(self):
        """Names, sizes and mtimes of every file under the SR and the state dir."""
        out = {}
        for top in (self.sr_base, self.state_dir):
            for dirpath, _, names in os.walk(top):
                for n in names:
                    p = os.path.join(dirpath, n)
                    st = os.stat(p)
                    out[p] = (st.st_size, st.st_mtime_ns)
        return out


class Vm(object):
    def __init__(self, world, ref, paths):
        self.world = world
        self.ref = ref
        self.paths = paths
        self.tapdisks = {}

    @property
    def uuid(self):
        return self.world.xapi.record("VM", self.ref)["uuid"]

    def start(self):
        """Serve the disks with real tapdisks, a guest writing through each; Running."""
        from livesnap.tools import tap_ctl
        tds = self.world.tapdisks
        for t, p in self.paths.items():
            pid, minor = tds.create(p)
            self.tapdisks[t] = tap_ctl.parse_list(self.world.tap_ctl("list", "-m", minor)[1])[0]
        for td in self.tapdisks.values():
            tds.wait_acks(td.pid, td.minor, 3)
        self.world.xapi.record("VM", self.ref)["power_state"] = "Running"
        self.world.xapi.record("VM", self.ref)["resident_on"] = self.world.xapi.host

    def ack_log(self, t):
        td = self.tapdisks[t]
        return self.world.tapdisks.ack_log(td.pid, td.minor)

    def stop(self):
        """Stop the guests, close the tapdisks; every acknowledged write is in the disk (read
        through a fresh real tapdisk), ``vhd-util check`` passes; Halted."""
        from testxen.verify import assert_intact
        for t, td in self.tapdisks.items():
            log = self.ack_log(t)
            rc, out, err = self.world.tapdisks.destroy(td.pid, td.minor)
            assert rc == 0, err
            assert_intact(log, self.paths[t])
            assert blktap.check(self.paths[t]) == []
        self.tapdisks = {}
        self.world.xapi.record("VM", self.ref)["power_state"] = "Halted"
        self.world.xapi.record("VM", self.ref)["resident_on"] = "OpaqueRef:NULL"
