"""Names and text livesnap cannot keep are refused before anything changes (issue 16, classes
4 and 5): image paths too long for the file system (or LVM), descriptions libvirt's XML,
XAPI or a terminal cannot hold; what an older catalog already holds is never printed raw,
and a journaled path that can never exist is rolled back by ``recover``."""
import json
import os
import sqlite3

import pytest

from helpers import Dom, domain_xml, qemu_img
from livesnap import text
from livesnap.engine import names
from livesnap.errors import UsageError

LONG_DOMAIN = "d" * 200                  # libvirt takes it; "<domain>-<disk>." is 205 bytes


class NamedDom(Dom):
    """A shut-off domain with one qcow2 disk and the name given."""

    def __init__(self, conn, tmp_path, name):
        self.conn = conn
        self.dir = str(tmp_path / "images")
        os.makedirs(self.dir)
        self.state_dir = str(tmp_path / "state")
        self.name = name
        self.targets = ["vda"]
        path = os.path.join(self.dir, "vda.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", path, "8M")
        self.dom = conn.defineXML(domain_xml(name, [("vda", path, "qcow2")]))


@pytest.fixture
def long_dom(conn, tmp_path):
    import uuid
    d = NamedDom(conn, tmp_path, LONG_DOMAIN[:-9] + "-" + uuid.uuid4().hex[:8])
    try:
        yield d
    finally:
        d.destroy()


def refused(dom, args, words, rc=1):
    before = dom.fingerprint()
    proc = dom.cli(*args, expect=rc)
    err = proc.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in err, (w, err)
    assert dom.fingerprint() == before
    return err


def journal(dom):
    db = sqlite3.connect(os.path.join(dom.state_dir, dom.dom.UUIDString() + ".db"))
    try:
        return db.execute("SELECT id, op, status FROM operations ORDER BY id").fetchall()
    finally:
        db.close()


# -- class 4: paths too long -------------------------------------------------------------

def test_image_name_too_long_is_refused_before_it_is_journaled(long_dom):
    """The issue's case: a 200-character domain name and a valid 100-character snapshot
    name give an image name over 255 bytes."""
    d = long_dom
    d.json("snapshot-list", d.name)                  # the catalog exists (adopted)
    for args in (["snapshot-create", d.name, "s" * 100],
                 ["snapshot-create", d.name, "s" * 100, "--dry-run"],
                 ["snapshot-create", d.name, "x" * 35]):     # 246 bytes: no room for trash
        refused(d, args, ["cannot create an image at", "bytes"])
    assert journal(d) == []
    # a name that fits is taken, and recover has nothing to do
    d.json("snapshot-create", d.name, "s" * 29)
    d.json("snapshot-create", d.name, "t")
    assert d.json("check", d.name)["ok"]
    assert d.json("recover", d.name)["recovered"] is None


def test_revert_leaf_name_too_long_is_refused(long_dom):
    """Variant: the revert's new leaf (``<domain>-<disk>.revert-<name>.qcow2``) is longer
    than the snapshot's own image name was."""
    d = long_dom
    d.json("snapshot-create", d.name, "r" * 29)
    refused(d, ["snapshot-revert", d.name, "r" * 29], ["cannot create an image at"])
    refused(d, ["snapshot-revert", d.name, "r" * 29, "--keep-current", "k"],
            ["cannot create an image at"])
    assert [row[2] for row in journal(d)] == ["done"]
    assert d.json("check", d.name)["ok"]


def test_recover_rolls_back_an_operation_journaled_with_an_impossible_path(long_dom):
    """What an older livesnap left: a create journaled with a leaf path over NAME_MAX.
    ``recover`` puts the domain back to "before" with a clear message; then it works."""
    from livesnap.catalog import Catalog
    from livesnap.model.planner import Plan
    d = long_dom
    d.json("reclaim", d.name)           # the domain adopted (a dry run no longer keeps that)
    plan = d.json("snapshot-create", d.name, "ok", "--dry-run")
    steps = plan["steps"]
    for it in steps[0]["items"]:
        it["leaf_path"] = os.path.join(d.dir, "%s-%s.%s.qcow2" % (d.name, it["disk"], "s" * 100))
    cat = Catalog.for_domain(d.state_dir, d.dom.UUIDString(), d.name)
    op_id = cat.begin(Plan("create", d.name, steps, {"snapshot": "s" * 100}))
    cat.close()
    before = d.fingerprint()
    refused(d, ["snapshot-create", d.name, "t"], ["recover"])
    proc = d.cli("recover", d.name)
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith("rolled back operation #%d (create): cannot create an image"
                                  % op_id), proc.stdout
    after = d.fingerprint()
    assert after["files"] == before["files"] and after["xml"] == before["xml"]
    assert journal(d)[-1] == (op_id, "create", "rolled-back")
    assert d.json("check", d.name)["ok"]
    assert d.json("recover", d.name)["recovered"] is None
    d.json("snapshot-create", d.name, "t")
    assert [s["name"] for s in d.json("snapshot-list", d.name)["snapshots"]] == ["t"]


def test_path_rule_for_files_and_lvs(tmp_path):
    """Variants by datapath: a file name (qcow2, VHD file) and an LV name (LVHD, LVM's 127)
    have their own limits; characters no tool takes are refused."""
    d = str(tmp_path)
    assert names.path_problem(os.path.join(d, "a" * 240)) is None
    assert "240" in names.path_problem(os.path.join(d, "a" * 241))
    assert "bytes" in names.path_problem(os.path.join(d, "\u00e9" * 121))  # 242 bytes
    assert names.path_problem(os.path.join(d, "a\nb")) is not None
    assert names.path_problem("/dev/VG_XenStorage-x/" + "a" * 127) is None
    assert "127" in names.path_problem("/dev/VG_XenStorage-x/" + "a" * 128)
    assert names.path_problem("/dev/VG_XenStorage-x/-lv") is not None
    deep = os.path.join(d, *(["p" * 200] * 21))
    assert "PATH_MAX" in names.path_problem(deep)
    assert names.place_problem(os.path.join(d, "missing", "x.qcow2")) is not None
    assert names.place_problem(os.path.join(d, "x.qcow2")) is None


# -- class 5: text libvirt, XAPI or a terminal cannot hold ---------------------------------

BAD_DESCRIPTIONS = ["esc \x1b[2J here", "two\nlines", "cr\rhere", "c1 \x85 next line",
                    "csi \x9b", "bidi \u202e reversed", "isolate \u2066 x", "nul-ish \x7f",
                    "nonchar \ufffe", "long " + "x" * 1100]


@pytest.fixture
def dom(make_dom):
    d = make_dom(ndisks=1)
    d.json("snapshot-create", d.name, "s1", "--description", "first\tone")
    return d


def libvirt_names(dom):
    return sorted(s.getName() for s in dom.dom.listAllSnapshots(0))


def test_descriptions_libvirt_or_a_terminal_cannot_hold_are_refused(dom):
    for bad in BAD_DESCRIPTIONS:
        err = refused(dom, ["snapshot-create", dom.name, "s2", "--description", bad],
                      ["invalid description"], rc=2)
        assert "\x1b" not in err and "\x85" not in err and "\u202e" not in err
    assert libvirt_names(dom) == ["s1"]
    dom.json("snapshot-create", dom.name, "s2", "--description", "fine, with a tab\t")
    assert libvirt_names(dom) == ["s1", "s2"]
    assert dom.json("check", dom.name)["ok"]


def test_the_python_api_refuses_the_same(dom):
    from livesnap.engine.engine import Engine
    eng = Engine(connect="qemu:///system", state_dir=dom.state_dir)
    before = dom.fingerprint()
    for bad in BAD_DESCRIPTIONS + ["lone \ud800 surrogate", 7]:
        with pytest.raises(UsageError) as e:
            eng.create(dom.name, "s2", bad)
        assert "invalid description" in str(e.value)
    assert dom.fingerprint() == before


def test_an_older_catalogs_control_characters_are_escaped_and_libvirt_kept_in_step(dom):
    """A catalog written before the rule may hold a description libvirt refuses and names
    with control characters: the next operation still brings libvirt's metadata in step,
    and no raw control character reaches the terminal."""
    db = sqlite3.connect(os.path.join(dom.state_dir, dom.dom.UUIDString() + ".db"))
    db.execute("UPDATE snapshots SET description=? WHERE name='s1'", ("esc \x1b[31m red",))
    db.commit()
    db.close()
    dom.json("snapshot-create", dom.name, "s2")
    assert libvirt_names(dom) == ["s1", "s2"]
    assert dom.json("check", dom.name)["ok"]
    listed = dom.json("snapshot-list", dom.name)["snapshots"]
    assert listed[0]["description"] == "esc \x1b[31m red"      # JSON keeps it, escaped
    # a name with control characters (libvirt may hold one made by hand)
    db = sqlite3.connect(os.path.join(dom.state_dir, dom.dom.UUIDString() + ".db"))
    bad = "s2\x1b]0;owned\x07\u202e"
    db.execute("UPDATE snapshots SET name=? WHERE name='s2'", (bad,))
    db.execute("UPDATE nodes SET snapshot=? WHERE snapshot='s2'", (bad,))
    db.commit()
    db.close()
    for args in (["snapshot-list", dom.name], ["snapshot-list", dom.name, "--tree"],
                 ["snapshot-delete", dom.name, "nope"], ["check", dom.name]):
        proc = dom.cli(*args, expect=None)
        for text in (proc.stdout, proc.stderr):
            assert not any(c in text for c in "\x1b\x07\u202e"), (args, text)
    assert "s2\\x1b]0;owned\\x07\\u202e" in dom.cli("snapshot-list", dom.name).stdout


def test_text_rule():
    assert text.text_problem("kernel 6.1, before the upgrade\t(ok)") is None
    for bad in BAD_DESCRIPTIONS + ["\ud800", "\uffff", "\u2069"]:
        assert text.text_problem(bad) is not None, repr(bad)
    assert text.printable("a\x1b[0m\u202eb\n") == "a\\x1b[0m\\u202eb\\x0a"
    assert text.xml_text("a\x1bb\nc") == "a\\x1bb\nc"


@pytest.mark.parametrize("bad", ["tab\there", "c1\x85here", "bidi\u202eereh"])
def test_domain_names_with_control_characters_give_no_image_names(conn, tmp_path, bad):
    """Variant: libvirt takes these domain names, but an image named after them would carry
    the character into file names, logs and terminals: refused before anything changes."""
    import uuid
    d = NamedDom(conn, tmp_path, bad + "-" + uuid.uuid4().hex[:8])
    try:
        d.json("snapshot-list", d.name)
        err = refused(d, ["snapshot-create", d.name, "s1"], ["cannot create an image at",
                                                             "U+"])
        assert not any(c in err for c in "\t\x85\u202e")
        assert journal(d) == []
    finally:
        d.destroy()


def test_domain_names_with_shell_and_qemu_punctuation_work(conn, tmp_path):
    """Variant: what is only punctuation (space, quotes, comma, colon) is a file name like
    any other: create, merge, revert and check work."""
    import uuid
    d = NamedDom(conn, tmp_path, "we'ird \"name\",a:b-" + uuid.uuid4().hex[:8])
    try:
        d.json("snapshot-create", d.name, "s1")
        d.write("vda", 1, 0)
        d.json("snapshot-create", d.name, "s2")
        d.json("snapshot-delete", d.name, "s1")
        d.json("snapshot-revert", d.name, "s2", "--keep-current", "k")
        assert d.json("check", d.name)["ok"]
    finally:
        d.destroy()


def test_log_lines_carry_no_raw_control_characters(dom):
    """Variant: log lines (--debug) and recover's report name a snapshot an older catalog
    holds with C1 and bidi characters (XML holds them, so libvirt does): escaped like any
    other output."""
    db = sqlite3.connect(os.path.join(dom.state_dir, dom.dom.UUIDString() + ".db"))
    bad = "s1\x85\x9b8m\u202e"
    db.execute("UPDATE snapshots SET name=? WHERE name='s1'", (bad,))
    db.execute("UPDATE nodes SET snapshot=? WHERE snapshot='s1'", (bad,))
    db.commit()
    db.close()
    proc = dom.cli("recover", dom.name, "--debug", expect=0)
    assert "defined s1\\x85\\x9b8m\\u202e" in proc.stdout, (proc.stdout, proc.stderr)
    assert "s1\\x85\\x9b8m\\u202e" in proc.stderr
    for text in (proc.stdout, proc.stderr):
        assert not any(c in text for c in "\x85\x9b\u202e"), text
    assert libvirt_names(dom) == [bad]


def test_recover_rolls_back_a_revert_whose_later_step_cannot_be(make_dom):
    """Variant: a revert of two disks journaled with the second disk's new leaf impossible
    (step 3 of 4); its first step's new leaf was made (the crash came after it), the
    domain's disks not yet changed: back to "before", the made leaf removed."""
    from livesnap.catalog import Catalog
    from livesnap.model.planner import Plan
    d = make_dom(ndisks=2)
    d.json("snapshot-create", d.name, "s1")
    d.write("vda", 1, 0)
    plan = d.json("snapshot-revert", d.name, "s1", "--dry-run")
    steps = plan["steps"]
    assert [s["op"] for s in steps] == ["new_leaf", "remove", "new_leaf", "remove"]
    steps[2]["leaf_path"] = os.path.join(d.dir, "x" * 300 + ".qcow2")
    before = d.fingerprint()
    qemu_img("create", "-q", "-f", "qcow2", "-b", steps[0]["parent_path"], "-F", "qcow2",
             steps[0]["leaf_path"])
    cat = Catalog.for_domain(d.state_dir, d.dom.UUIDString(), d.name)
    op_id = cat.begin(Plan("revert", d.name, steps, {"snapshot": "s1"}))
    cat.close()
    proc = d.cli("recover", d.name)
    assert proc.stdout.startswith("rolled back operation #%d (revert)" % op_id), proc.stdout
    after = d.fingerprint()
    assert after["files"] == before["files"] and after["xml"] == before["xml"]
    assert d.json("check", d.name)["ok"]


def test_recover_that_cannot_go_back_says_so_in_one_line(make_dom):
    """Variant: the first step is marked done (the domain's disk already changed) and a
    later one needs a path that cannot exist: one clear error, no traceback."""
    from livesnap.catalog import Catalog
    from livesnap.model.planner import Plan
    d = make_dom(ndisks=2)
    d.json("snapshot-create", d.name, "s1")
    plan = d.json("snapshot-revert", d.name, "s1", "--dry-run")
    steps = plan["steps"]
    steps[2]["leaf_path"] = os.path.join(d.dir, "x" * 300 + ".qcow2")
    cat = Catalog.for_domain(d.state_dir, d.dom.UUIDString(), d.name)
    op_id = cat.begin(Plan("revert", d.name, steps, {"snapshot": "s1"}))
    cat.close()
    # step 1 (the first new leaf) carried out and marked done by hand, as livesnap would
    from livesnap.engine.engine import Engine
    eng = Engine(connect="qemu:///system", state_dir=d.state_dir)
    with eng._session(d.name) as s:
        dp = eng.datapath_for(s.domain)
        eng.load(s, datapath=dp)
        dp.run(steps[0])
        tree = s.catalog.load_tree()
        from livesnap.model import planner
        planner.apply(tree, steps[0])
        s.catalog.step_done(op_id, 0, tree)
    proc = d.cli("recover", d.name, expect=1)
    err = proc.stderr.strip()
    assert err.startswith("error: cannot create an image at") and len(err.splitlines()) == 1
    assert "operation #%d (revert)" % op_id in err and "cannot be finished" in err
