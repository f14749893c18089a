"""Paths the XAPI tests share (a module of its own: ``conftest`` is ambiguous across test
directories)."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN = os.path.join(ROOT, "xapi_plugin", "livesnap")
