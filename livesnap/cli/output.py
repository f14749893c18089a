"""How results are shown: one JSON document on stdout, or text for people."""
import json
import sys

from livesnap.text import printable


def emit(args, result, text_fn):
    if getattr(args, "output", "text") == "json":
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        # names and descriptions come from catalogs and libvirt: no raw control character
        # reaches the terminal
        for line in text_fn(result):
            print(printable(line))


def _pause(result):
    p = result.get("pause_ms")
    if p is None:
        return ""
    if result.get("pause_measured") == "call":
        return ", guest IO paused at most %.1f ms (the libvirt call's duration)" % p
    return ", guest IO paused %.1f ms" % p


def text_create(r):
    skipped = ["left out %s: %s" % (d["target"], d["reason"]) for d in r.get("skipped") or []]
    if r.get("dry_run"):
        return ["would create snapshot %s:" % r["snapshot"]] + ["  " + l for l in r["plan"]] + \
            skipped
    lines = ["snapshot %s created%s" % (r["snapshot"], _pause(r))]
    lines += ["  %s: %s" % (d["target"], d["image"]) for d in r.get("disks", [])]
    return lines + skipped


def text_delete(r):
    if r.get("dry_run"):
        return ["would delete snapshot %s (%s):" % (r["snapshot"], r["action"])] + \
               ["  " + l for l in r["plan"]]
    verb = {"deleted": "deleted", "merged": "deleted, its image merged with its only child",
            "hidden": "deleted logically (hidden: its image is kept for its children and "
                      "reclaimed when one child is left)"}[r["action"]]
    lines = ["snapshot %s %s%s" % (r["snapshot"], verb, _pause(r))]
    if r.get("reclaimed"):
        lines.append("reclaimed: " + ", ".join(r["reclaimed"]))
    lines += _in_use(r)
    return lines


def _in_use(r):
    return ["kept %s: also used by %s" % (k["image"], ", ".join(k["users"]))
            for k in r.get("in_use") or []]


def text_revert(r):
    if r.get("dry_run"):
        return ["would revert to %s:" % r["snapshot"]] + ["  " + l for l in r["plan"]]
    lines = ["reverted to snapshot %s" % r["snapshot"]]
    if r.get("kept"):
        lines.append("the previous state is kept as snapshot %s" % r["kept"])
    if r.get("reclaimed"):
        lines.append("reclaimed: " + ", ".join(r["reclaimed"]))
    lines += _in_use(r)
    return lines


def text_list(r, tree=False):
    snaps = r["snapshots"]
    if tree:
        return _tree_lines(r)
    if not snaps:
        return ["no snapshots"]
    rows = [("Name", "Creation Time", "State", "Parent", "Disks")]
    for s in snaps:
        name = s["name"] + (" *" if s["name"] == r.get("current") else "")
        rows.append((name, s["created"][:19].replace("T", " "), s["state"], s["parent"] or "-",
                     ",".join(d["target"] for d in s["disks"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("-" * len(lines[0]))
    return lines


def _tree_lines(r):
    snaps = {s["name"]: s for s in r["snapshots"]}
    kids = {}
    for s in r["snapshots"]:
        parent = s["parent"] if s["parent"] in snaps else None
        kids.setdefault(parent, []).append(s["name"])
    lines = []

    def label(name):
        s = snaps[name]
        tags = []
        if s["state"] == "hidden":
            tags.append("hidden")
        if name == r.get("current"):
            tags.append("current")
        return name + (" (%s)" % ", ".join(tags) if tags else "")

    def walk(name, prefix, last):
        lines.append(prefix + ("└── " if last else "├── ") + label(name))
        children = kids.get(name, [])
        for i, c in enumerate(children):
            walk(c, prefix + ("    " if last else "│   "), i == len(children) - 1)

    roots = kids.get(None, [])
    for root in roots:
        lines.append(label(root))
        children = kids.get(root, [])
        for i, c in enumerate(children):
            walk(c, "", i == len(children) - 1)
    return lines or ["no snapshots"]


def text_recover(r):
    if r.get("rolled_back"):
        return ["rolled back operation #%d (%s): %s" % (r["recovered"], r["op"], r["reason"])]
    if r["recovered"] is None and r.get("metadata"):
        return ["libvirt's snapshot metadata of %s brought in step with livesnap's catalog: %s"
                % (r["domain"], ", ".join("%s %s" % (c, n) for c, n in r["metadata"]))]
    if r["recovered"] is None:
        return ["nothing to recover for %s" % r["domain"]]
    return ["finished operation #%d (%s): steps %d..%d carried out"
            % (r["recovered"], r["op"], r["steps_done_before"] + 1, r["steps"])]


def text_check(r):
    notes = ["  note: " + n for n in r.get("notes") or []]
    rep = r.get("repaired")
    if rep is not None:
        notes = ["  repaired: adopted %s; gone %s" % (", ".join(rep["adopted"]) or "nothing",
                                                     ", ".join(rep["gone"]) or "nothing")] + notes
    if r["ok"]:
        return ["%s: catalog and images agree" % r["domain"]] + notes
    return ["%s: %d problem(s)" % (r["domain"], len(r["problems"]))] + \
           ["  " + p for p in r["problems"]] + notes
