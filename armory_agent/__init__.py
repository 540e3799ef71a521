"""The device's only door: supervises Clef and serves its JSON-RPC on the USB link only.

Standard library only: it runs on the device under Debian's own python3.
"""

__version__ = "0.1.0"

# Go's soft memory limit for every Clef the device starts (the agent's, and provisioning's
# init/newaccount/setpw/attest). Standard scrypt still gets its 256 MiB (the limit is soft), but Go
# collects and returns that buffer as soon as it is garbage instead of keeping the heap grown to it:
# measured with the host Clef 1.17.3, `newaccount` peaks at 289 MB (552 MB without a limit, 308 MB
# with 300MiB, which was OOM-killed on a 512 MiB guest without one) and after unlock Clef's RSS
# falls from 326 MiB to 70 MiB within seconds (with 300MiB it stayed at 326 MiB until Go's
# two-minute forced collection). Lower limits only make the collector busier: Clef's live heap after
# unlock is about 40 MiB (rules engine, 4byte database) plus 34 MiB of mapped binary.
CLEF_GOMEMLIMIT = "64MiB"
