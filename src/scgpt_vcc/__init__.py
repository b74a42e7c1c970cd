"""scgpt-vcc: finetune scGPT on Virtual Cell Challenge data in GEARS format."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scgpt-vcc")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
