"""``python -m livesnap``: the ``livesnap`` program (through the livesnap service when one
listens, see ``livesnap.cli.client``)."""
from livesnap.cli.client import run

run()
