"""Removing merged-away images: stepwise shrinking only where freeing blocks discards them."""
import os

from livesnap import datapaths


def _mount_options(path):
    dev = os.stat(path).st_dev
    want = "%d:%d" % (os.major(dev), os.minor(dev))
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == want:
                return fields[5].split(",") + fields[fields.index("-", 6) + 3].split(",")
    return None


def test_discards_on_free_follows_the_mount_options(tmp_path):
    options = _mount_options(str(tmp_path))
    want = True if options is None else ("discard" in options or "discard=sync" in options)
    assert datapaths.discards_on_free(str(tmp_path)) is want
    assert datapaths.discards_on_free("/proc/self") is False        # proc: never discards
    assert datapaths.discards_on_free(str(tmp_path / "missing")) is True   # unknown: careful


def test_unlink_removes_big_files_either_way(tmp_path, monkeypatch):
    for discards in (True, False):
        path = tmp_path / ("img-%s" % discards)
        with open(str(path), "wb") as f:
            f.truncate(3 * datapaths.TRUNCATE_STEP + 12345)
        monkeypatch.setattr(datapaths, "discards_on_free", lambda p, d=discards: d)
        datapaths.unlink(str(path))
        assert not path.exists()
        datapaths.unlink(str(path))                      # already gone: fine
