"""The installed distribution's version (ground floor: what the stats and /health report)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("offgrid-jupyter")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
