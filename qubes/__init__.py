"""Qubes OS support: dapp qubes reach the armory through qrexec and dom0 policy (docs/qubes.md).

`files` renders what goes into the armory qube and the dapp qubes (templates under
qubes/templates/), `policy` writes the dom0 policy file and `policylint` checks it.
"""

from clef_armory.errors import ArmoryError


class QubesError(ArmoryError):
    """Bad Qubes flags, or a policy file that dom0 would reject or misread."""
