"""One thin module per external command, all run through ``runner.run``."""
