"""The version of localify (one place; the package and saved recipes read it)."""

__version__ = "0.1.0"
