"""The device's only door: supervises Clef and serves its JSON-RPC on the USB link only.

Standard library only: it runs on the device under Debian's own python3.
"""

__version__ = "0.1.0"
