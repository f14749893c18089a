"""What a snapshot name may be: it becomes part of image file names, so no path syntax."""
import re

from livesnap.errors import UsageError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@-]{0,99}\Z")


def check_snapshot_name(name):
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise UsageError(reason="invalid snapshot name %r: use 1-100 letters, digits and . _ + @ -, "
                                "starting with a letter or digit" % (name,))
    return name
