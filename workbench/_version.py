"""The package's version, in one place: ``wb.__version__`` and every checkpoint's ``versions`` record read it."""

__version__ = "0.1.0"
