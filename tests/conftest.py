"""Shared fixtures: a libvirt connection to the real libvirtd, shut-off domains in tmp_path."""
import pytest

from helpers import URI, Dom


@pytest.fixture(scope="session")
def conn():
    import libvirt
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    c = libvirt.open(URI)
    yield c
    c.close()


@pytest.fixture
def make_dom(conn, tmp_path):
    made = []

    def make(ndisks=2, base=True, sub=None):
        d = Dom(conn, tmp_path / (sub or "d%d" % len(made)), ndisks, base)
        made.append(d)
        return d
    yield make
    for d in made:
        d.destroy()
