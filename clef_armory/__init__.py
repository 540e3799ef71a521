"""clef-armory: shared library for the laptop-side tools (config, errors, Clef acquisition)."""

__version__ = "0.1.0"
