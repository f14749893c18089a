"""``livesnap vhd``: vhd-util flags, output formats and exit codes; check/repair behaviour."""
import os
import subprocess
import sys

from livesnap import vhd
from livesnap.vhd import cli

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args, stdin=None):
    p = subprocess.Popen([sys.executable, "-m", "livesnap.vhd"] + list(args), cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(stdin)
    return p.returncode, out, err


def test_cli_create_snapshot_query(tmp_path, capsys):
    a, b = str(tmp_path / "a.vhd"), str(tmp_path / "b.vhd")
    assert cli.main(["create", "-n", a, "-s", "65"]) == 0
    assert cli.main(["snapshot", "-n", b, "-p", a]) == 0
    capsys.readouterr()
    assert cli.main(["query", "-n", b, "-v", "-s", "-p", "-f", "-d", "-a"]) == 0
    assert capsys.readouterr().out == "65\n5120\n%s\nhidden: 0\nchain depth: 2\n0\n" % a
    assert cli.main(["query", "-n", a, "-p"]) == 0
    assert capsys.readouterr().out == "%s has no parent\n" % a
    assert cli.main(["query", "-n", b, "-p", "-u"]) == 0
    assert capsys.readouterr().out == "./a.vhd\n"
    assert cli.main(["set", "-n", b, "-f", "hidden", "-v", "1"]) == 0
    assert cli.main(["query", "-n", b, "-f"]) == 0
    assert capsys.readouterr().out == "hidden: 1\n"
    assert cli.main(["check", "-n", b]) == 0
    assert capsys.readouterr().out == "%s is valid\n" % b
    assert cli.main(["read", "-n", b, "-p"]) == 0
    out = capsys.readouterr().out
    assert "Disk type           : Differencing hard disk" in out and "Parent name         : a.vhd" in out


def test_cli_exit_codes(tmp_path, capsys):
    a, b, c = (str(tmp_path / n) for n in ("a.vhd", "b.vhd", "c.vhd"))
    assert cli.main(["query", "-n", a, "-v"]) == 2                  # ENOENT
    cli.main(["create", "-n", a, "-s", "8"])
    assert cli.main(["coalesce", "-n", a]) == 22                   # not differencing
    cli.main(["snapshot", "-n", b, "-p", a])
    cli.main(["snapshot", "-n", c, "-p", b, "-e"])
    assert cli.main(["snapshot", "-n", str(tmp_path / "d.vhd"), "-p", c, "-e", "-l", "3"]) == 28
    assert cli.main(["modify", "-n", b, "-p", str(tmp_path / "none.vhd")]) == 2
    assert cli.main(["resize", "-n", b, "-s", "16", "-f"]) == 34
    assert cli.main(["resize", "-n", b, "-s", "16", "-j", "j"]) == 0
    assert cli.main(["coalesce", "-n", b]) == 34                   # child bigger than parent
    assert cli.main(["resize", "-n", b, "-s", "4", "-j", "j"]) == 38
    assert cli.main(["read", "-n", a, "-R", str(8 * MiB), "-c", "1"]) == 34
    capsys.readouterr()


def test_cli_read_write_coalesce_pull(tmp_path):
    a, b = str(tmp_path / "a.vhd"), str(tmp_path / "b.vhd")
    assert run("create", "-n", a, "-s", "8")[0] == 0
    assert run("snapshot", "-n", b, "-p", a)[0] == 0
    rc, out, err = run("write", "-n", b, "-R", "1000", stdin=b"hello world")
    assert rc == 0, err
    src = tmp_path / "in.bin"
    src.write_bytes(b"Z" * 5000)
    assert run("write", "-n", a, "-R", str(2 * MiB), "-i", str(src))[0] == 0
    rc, out, _ = run("read", "-n", b, "-R", "998", "-c", "15")
    assert rc == 0 and out == b"\0\0hello world\0\0"
    assert run("read", "-n", b, "-R", str(2 * MiB), "-c", "3")[1] == b"ZZZ"
    rc, out, _ = run("coalesce", "-n", b)
    assert rc == 0 and out == b"Coalesced 1 sectors\n"
    assert vhd.read(a, 1000, 11) == b"hello world"
    assert run("write", "-n", b, "-R", "0", stdin=b"B" * 512)[0] == 0
    rc, out, _ = run("pull", "-n", b, "--reparent")
    assert rc == 0 and out.startswith(b"Pulled ")
    assert run("query", "-n", b, "-p")[1] == ("%s has no parent\n" % b).encode()
    assert vhd.read(b, 0, 3 * MiB) == b"B" * 512 + vhd.read(a, 512, 3 * MiB - 512)
    rc, out, _ = run("check", "-n", b, "-b")
    assert rc == 0


def test_check_finds_and_repair_fixes(tmp_path):
    a = str(tmp_path / "a.vhd")
    vhd.create(a, 8 * MiB)
    vhd.write(a, 0, b"x" * 4096)
    good = open(a, "rb").read()
    # lost primary footer (file ends with a data block)
    with open(a, "r+b") as f:
        f.truncate(len(good) - 512)
    assert vhd.check(a) and vhd.check(a, ignore_missing_footer=True) == []
    vhd.repair(a)
    assert open(a, "rb").read() == good
    # corrupt primary
    with open(a, "r+b") as f:
        f.seek(len(good) - 500)
        f.write(b"junk")
    assert any("primary footer" in p for p in vhd.check(a))
    assert run("repair", "-n", a)[0] == 0
    assert open(a, "rb").read() == good
    # corrupt backup
    with open(a, "r+b") as f:
        f.seek(10)
        f.write(b"junk")
    assert any("backup" in p for p in vhd.check(a))
    vhd.repair(a)
    assert open(a, "rb").read() == good
    # primary/backup mismatch: -b takes the backup
    vhd.set_hidden(a, 1)
    with open(a, "r+b") as f:
        f.write(good[:512])
    assert vhd.check(a)
    vhd.repair(a, use_backup=True)
    assert open(a, "rb").read() == good
    # bad header: repair cannot help, typed error
    with open(a, "r+b") as f:
        f.seek(600)
        f.write(b"junk")
    assert any("header" in p for p in vhd.check(a))
    rc, out, err = run("check", "-n", a)
    assert rc == 22 and b"appears invalid" in out
    assert run("query", "-n", a, "-v")[0] == 22


def test_check_structural_findings(tmp_path):
    a, b = str(tmp_path / "a.vhd"), str(tmp_path / "b.vhd")
    vhd.create(a, 8 * MiB)
    vhd.write(a, 0, b"x" * 4096)
    vhd.write(a, 2 * MiB, b"y" * (2 * MiB))
    vhd.snapshot(b, a)
    good = open(a, "rb").read()

    def patched(off, data):
        buf = bytearray(good)
        buf[off:off + len(data)] = data
        with open(a, "wb") as f:
            f.write(buf)
        return vhd.check(a)

    import struct
    assert any("overlap" in p for p in patched(1536 + 4, struct.pack(">I", 7 + 100)))
    assert any("metadata" in p for p in patched(1536, struct.pack(">I", 3)))
    assert any("batmap checksum" in p for p in patched(2560, b"\xff"))
    assert any("batmap cookie" in p for p in patched(2048, b"xxxxxxxx"))
    buf = bytearray(good)
    buf[len(good) - 512 + 20] ^= 0xFF                                # data_offset, bad checksum
    with open(a, "wb") as f:
        f.write(buf)
    assert any("primary footer invalid" in p for p in vhd.check(a))
    with open(a, "wb") as f:
        f.write(good)
    assert vhd.check(b, parents=True) == []
    # locator naming another file than the header
    raw = bytearray(open(b, "rb").read())
    raw[3072:3072 + 14] = b"file://./z.vhd"
    with open(b, "wb") as f:
        f.write(raw)
    assert any("names" in p for p in vhd.check(b))
    assert any("does not exist" in p for p in vhd.check(b))


def test_vermin_py36():
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    p = subprocess.Popen([vermin, "-t=3.6-", "--no-tips", "--violations",
                          os.path.join(ROOT, "livesnap", "vhd")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = p.communicate()
    assert p.returncode == 0, out.decode()
    assert b"!" not in out, out.decode()
