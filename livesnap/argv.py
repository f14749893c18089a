"""virsh's order of a command line, ``livesnap -c URI --output json snapshot-list vm1``
(global options before the command), as the parser takes it: those options moved after the
command's name. Runs first in every command (the launcher) and again in the command table
(a command handed over by an older client): built-in modules only; reordering an argv
already in that order changes nothing."""

# the global options (livesnap.cli.main.common_options) that take a value as the next word
VALUE_OPTIONS = ("-c", "--connect", "--domain-xml", "--output", "--state-dir",
                 "--storage-dir", "--max-depth")
# options of the program itself, answered before any command
PROGRAM_OPTIONS = ("-h", "--help", "--version")
# commands with parsers of their own, without the global options
OWN_PARSERS = ("vhd", "service")


def reorder(argv):
    """``argv`` with the options before the command's name moved just after it."""
    lead = []
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in PROGRAM_OPTIONS \
            and argv[i] != "--":
        word = argv[i]
        lead.append(word)
        i += 1
        if word in VALUE_OPTIONS and i < len(argv):
            lead.append(argv[i])
            i += 1
    if not lead or i >= len(argv) or argv[i].startswith("-") or argv[i] in OWN_PARSERS:
        return list(argv)
    return [argv[i]] + lead + list(argv[i + 1:])
