"""The sandbox's version, in one place (the package, recordings and reports read it)."""
__version__ = "0.1.0"
