"""Thin modules behind ``python -m detector <command>``: each parses its config section and calls
the package that does the work."""
