"""The catalog: one SQLite database per domain holding its snapshot tree and the journal.

Tables (schema version in ``meta``):

* ``nodes``      the images livesnap knows, with parent, state, owning snapshot, path;
* ``snapshots``  name, creation time, description, state (``snapshot`` or ``hidden``);
* ``disks``      each disk's active node;
* ``operations`` the intent journal: one row per operation with its whole plan (JSON),
                 ``steps_done`` counting the steps carried out, and a status.

Every step's effect on the tree is written in the same transaction that advances
``steps_done``, so the tree on disk is always the tree after exactly ``steps_done`` steps.
"""
import json
import os
import sqlite3
import time

from livesnap.errors import CatalogError
from livesnap.model.tree import Node, Snapshot, Tree

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    name TEXT PRIMARY KEY, created TEXT NOT NULL, description TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('snapshot', 'hidden')));
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY, disk TEXT NOT NULL, parent TEXT REFERENCES nodes(id),
    state TEXT NOT NULL CHECK (state IN ('active', 'snapshot', 'hidden', 'base')),
    snapshot TEXT REFERENCES snapshots(name), path TEXT NOT NULL, fmt TEXT NOT NULL,
    alloc INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS disks (target TEXT PRIMARY KEY, active TEXT NOT NULL REFERENCES nodes(id));
CREATE TABLE IF NOT EXISTS operations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, plan TEXT NOT NULL,
    steps_done INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL
        CHECK (status IN ('running', 'done', 'rolled-back', 'failed')),
    started REAL NOT NULL, finished REAL, error TEXT);
"""


class Operation(object):
    def __init__(self, id, op, plan, steps_done, status, error=None):
        self.id = id
        self.op = op
        self.plan = plan
        self.steps_done = steps_done
        self.status = status
        self.error = error


class Catalog(object):
    """The catalog of one domain, at ``<state_dir>/<domain uuid>.db``."""

    def __init__(self, path, domain_name=None):
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=OFF")
            if not self._up_to_date(domain_name):
                with self._txn():
                    for stmt in SCHEMA.split(";"):
                        if stmt.strip():
                            self.db.execute(stmt)
                    self._check_schema(self._meta("schema"))
                    if self._meta("schema") is None:
                        self.db.execute("INSERT INTO meta VALUES ('schema', ?)",
                                        (str(SCHEMA_VERSION),))
                    if domain_name is not None:
                        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('domain', ?)",
                                        (domain_name,))
        except sqlite3.DatabaseError as e:
            raise CatalogError(path, str(e))

    def _meta(self, key):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row is not None else None

    def _check_schema(self, version):
        if version is not None and int(version) > SCHEMA_VERSION:
            raise CatalogError(self.path, "schema version %s is newer than this livesnap "
                                          "understands (%d)" % (version, SCHEMA_VERSION))

    def _up_to_date(self, domain_name):
        """The catalog has every table, this schema version and the domain's name: opening
        it then writes nothing (no transaction, no sync)."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE "
                                                "type='table'")}
        if not tables >= {"meta", "snapshots", "nodes", "disks", "operations"}:
            return False
        version = self._meta("schema")
        self._check_schema(version)
        return (version == str(SCHEMA_VERSION)
                and (domain_name is None or self._meta("domain") == domain_name))

    @classmethod
    def for_domain(cls, state_dir, uuid, name):
        if not os.path.isdir(state_dir):
            os.makedirs(state_dir, 0o700)
        return cls(os.path.join(state_dir, uuid + ".db"), name)

    def close(self):
        self.db.close()

    def _txn(self):
        return _Transaction(self.db)

    # -- the tree ---------------------------------------------------------------------------

    def is_empty(self):
        return self.db.execute("SELECT COUNT(*) FROM disks").fetchone()[0] == 0

    def load_tree(self):
        nodes = [Node(id=r[0], disk=r[1], parent=r[2], state=r[3], snapshot=r[4], path=r[5],
                      fmt=r[6], alloc=r[7])
                 for r in self.db.execute("SELECT id, disk, parent, state, snapshot, path, fmt, "
                                          "alloc FROM nodes")]
        snaps = [Snapshot(r[0], r[1], r[2], r[3])
                 for r in self.db.execute("SELECT name, created, description, state FROM snapshots")]
        active = dict(self.db.execute("SELECT target, active FROM disks").fetchall())
        return Tree(nodes, snaps, active)

    def _write_tree(self, tree):
        self.db.execute("DELETE FROM nodes")
        self.db.execute("DELETE FROM snapshots")
        self.db.execute("DELETE FROM disks")
        for s in tree.snapshots.values():
            self.db.execute("INSERT INTO snapshots VALUES (?, ?, ?, ?)",
                            (s.name, s.created, s.description, s.state))
        for n in tree.nodes.values():
            self.db.execute("INSERT INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (n.id, n.disk, n.parent, n.state, n.snapshot, n.path, n.fmt, n.alloc))
        for d, nid in tree.active.items():
            self.db.execute("INSERT INTO disks VALUES (?, ?)", (d, nid))

    def save_tree(self, tree):
        with self._txn():
            self._write_tree(tree)

    # -- the journal -------------------------------------------------------------------------

    def begin(self, plan):
        """Record an operation's intent; returns its id."""
        with self._txn():
            cur = self.db.execute(
                "INSERT INTO operations (op, plan, status, started) VALUES (?, ?, 'running', ?)",
                (plan.op, json.dumps(plan.to_dict()), time.time()))
            return cur.lastrowid

    def step_done(self, op_id, index, tree, last=False):
        """Step ``index`` of operation ``op_id`` is done and ``tree`` is its effect; with
        ``last`` the operation is finished in the same transaction (one fsync less)."""
        with self._txn():
            self._write_tree(tree)
            self.db.execute("UPDATE operations SET steps_done=? WHERE id=?", (index + 1, op_id))
            if last:
                self.db.execute("UPDATE operations SET status='done', finished=? WHERE id=?",
                                (time.time(), op_id))

    def finish(self, op_id, status="done", error=None):
        with self._txn():
            self.db.execute("UPDATE operations SET status=?, finished=?, error=? WHERE id=?",
                            (status, time.time(), error, op_id))

    def set_plan(self, op_id, plan):
        """Replace an operation's remaining plan (recovery may re-plan after the last done step)."""
        with self._txn():
            self.db.execute("UPDATE operations SET plan=? WHERE id=?",
                            (json.dumps(plan.to_dict()), op_id))

    def unfinished(self):
        row = self.db.execute("SELECT id, op, plan, steps_done, status, error FROM operations "
                              "WHERE status IN ('running', 'failed') ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return None
        return Operation(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5])

    def known_names(self):
        """Every snapshot name livesnap has had for this domain: the tree's, and those of
        every operation that took effect (a snapshot deleted, merged away or kept)."""
        names = {r[0] for r in self.db.execute("SELECT name FROM snapshots")}
        for (plan,) in self.db.execute("SELECT plan FROM operations WHERE steps_done > 0"):
            for step in json.loads(plan).get("steps", []):
                if step.get("name"):
                    names.add(step["name"])
        return names

    def history(self, limit=20):
        rows = self.db.execute("SELECT id, op, plan, steps_done, status, error FROM operations "
                               "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [Operation(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5]) for r in rows]


class _Transaction(object):
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on an exception."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
        return False
