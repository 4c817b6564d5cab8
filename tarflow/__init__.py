"""tarflow: Tar (Vision as a Dialect) at corpus scale on Ray."""
try:
    from importlib.metadata import version as _version

    __version__ = _version("tarflow")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.1.0+src"
