"""What snapshot names and descriptions may be, and how stored text is shown.

A snapshot name becomes part of image file names, so no path syntax. A description is kept
in the catalog, in libvirt's snapshot XML and in XAPI's records, and shown on terminals: one
rule (``text_problem``) for what none of them can hold safely, used by the engine, the CLI
and the XAPI plugin alike (which runs on Python 3.6, stdlib only). Pure: no I/O.
"""
import re

from livesnap.errors import UsageError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@-]{0,99}\Z")
DESCRIPTION_MAX = 1024            # characters (the XAPI plugin's limit for any argument)

# What XML 1.0 cannot hold (C0 controls but tab, newline and carriage return; lone
# surrogates; U+FFFE, U+FFFF), what a terminal acts on instead of printing (every C0 and C1
# control, DEL) and what reorders the text shown around it (bidi embeddings, overrides and
# isolates). A description is one line: newline and carriage return are refused too (XML
# turns a carriage return into a newline, so it would not come back as it was given).
UNSAFE_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
                       "\ud800-\udfff\ufffe\uffff]")
# on output every control character goes, tab included (it breaks columns)
UNPRINTABLE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
                            "\ud800-\udfff\ufffe\uffff]")
# what XML 1.0 cannot hold at all
NOT_XML_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def check_snapshot_name(name):
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise UsageError(reason="invalid snapshot name %r: use 1-100 letters, digits and . _ + @ -, "
                                "starting with a letter or digit" % (name,))
    return name


def text_problem(text, max_chars=DESCRIPTION_MAX):
    """Why ``text`` cannot be a description (or a name) livesnap keeps, or None."""
    if not isinstance(text, str):
        return "it is not text"
    if len(text) > max_chars:
        return "it is %d characters long (at most %d)" % (len(text), max_chars)
    bad = UNSAFE_RE.search(text)
    if bad:
        return ("it contains U+%04X at position %d (no control characters, line breaks, "
                "bidirectional overrides or isolates, surrogates or non-characters)"
                % (ord(bad.group()), bad.start() + 1))
    return None


def check_description(text):
    problem = text_problem(text)
    if problem is not None:
        raise UsageError(reason="invalid description: %s" % problem)
    return text


def printable(text):
    """``text`` with every control character (and bidi override, lone surrogate and
    non-character) shown as an escape (``\\x1b``, ``\\u202e``): what goes to a terminal
    never carries raw control characters, whatever an older catalog holds."""
    def escape(m):
        c = ord(m.group())
        return "\\x%02x" % c if c < 0x100 else "\\u%04x" % c
    return UNPRINTABLE_RE.sub(escape, str(text))


def xml_text(text):
    """``text`` with what XML 1.0 cannot hold escaped as in ``printable`` (what libvirt is
    given from a catalog written before descriptions were checked)."""
    return NOT_XML_RE.sub(lambda m: printable(m.group()), text)
