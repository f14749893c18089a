"""The ``livesnap`` command line."""
