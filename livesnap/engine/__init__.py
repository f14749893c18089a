"""The engine: preflight, plan, journal, execute, recover."""
