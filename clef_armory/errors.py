"""One exception family, so the CLI has exactly one error path to the user.

Every error a user can cause or meet is an ``ArmoryError``; its ``str()`` is a
single plain line that says what went wrong and, where possible, what to do.
Anything else reaching the CLI is a bug and is shown as such.
"""


class ArmoryError(Exception):
    """Base class: the message is one line meant for a person."""


class ConfigError(ArmoryError):
    """Bad settings or task flags."""


class PrerequisiteError(ArmoryError):
    """A host tool or facility is missing; the message names the fix."""


class ClefError(ArmoryError):
    """Clef could not be built, downloaded or checked."""


class VerificationError(ClefError):
    """A signature, checksum or architecture check failed."""


class BuildError(ArmoryError):
    """Building the disk image failed."""


class FlashError(ArmoryError):
    """Writing or verifying a device failed, or the target was refused."""


class ProvisionError(ArmoryError):
    """Setting up or checking a device over SSH failed."""


class HostKeyError(ProvisionError):
    """The device's SSH host key is unknown or differs from the pinned one."""


class ContractError(ProvisionError):
    """The laptop and the device speak different contract versions (armory_agent/contract.py)."""


class UpdateError(ArmoryError):
    """./do update refused or could not finish (the device still boots its old system)."""


class QemuError(ArmoryError):
    """The emulated device (qemu-system-arm) could not be started, reached or stopped."""


class WalletError(ArmoryError):
    """The laptop's wallet endpoint (`./do wallet`) cannot start: its node, its armory or its address."""
