"""qsmflow: quantitative susceptibility mapping of the brain from BIDS datasets."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("qsmflow")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
