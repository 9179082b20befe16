"""fruitpipe's version: one definition, read by the package, the outputs it writes and its build (pyproject.toml)."""

__version__ = "0.1.0"
