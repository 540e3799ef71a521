"""The device's only door: supervises Clef and serves its JSON-RPC on the USB link only.

Standard library only: it runs on the device under Debian's own python3.
"""

__version__ = "0.1.0"

# Each scrypt run of Clef allocates 256 MiB and Go does not return the first buffer before the second run
# (newaccount runs two): without a soft limit `clef newaccount` peaked at 552 MB and was OOM-killed on a
# 512 MiB guest; with it, 290 MB. Every Clef process the device starts (the agent's, and provisioning's
# init/newaccount/setpw/attest) gets it.
CLEF_GOMEMLIMIT = "300MiB"
