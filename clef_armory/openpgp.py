"""Detached OpenPGP signatures checked by gpg against exactly one pinned key.

Clef's release archive and U-Boot's source tarball are both verified this way: gpg runs in a
throw-away home that holds only the key shipped in ``clef_armory/keys``, so nothing from the user's
own keyring (or a key server) can make a signature look good. Callers read the verdict and decide
what they accept (U-Boot's key has expired since it signed its release).
"""

from __future__ import annotations

import dataclasses
import subprocess
import tempfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What gpg said about one signature."""

    imported: bool  # the pinned key could be read at all
    returncode: int
    keywords: frozenset[str]  # status keywords seen: GOODSIG, EXPKEYSIG, BADSIG, NO_PUBKEY, ...
    signing_key: str | None = None  # VALIDSIG's fingerprint of the key that signed
    primary_key: str | None = None  # ...and of its primary key (the one we pin)

    def signed_by(self, fingerprint: str) -> bool:
        """A valid signature by the pinned key (its primary, or the signing subkey given directly)."""
        want = normalize(fingerprint)
        return self.returncode == 0 and want in (self.primary_key, self.signing_key)


def normalize(fingerprint: str) -> str:
    return fingerprint.replace(" ", "").upper()


def verify_detached(signed: Path, signature: Path, key: Path) -> Verdict:
    """Run ``gpg --verify`` with only ``key`` known; gpg must be installed (callers check)."""
    with tempfile.TemporaryDirectory(prefix="armory-gpg-") as home:
        base = ["gpg", "--homedir", home, "--batch", "--no-tty", "--no-auto-key-retrieve"]
        imp = subprocess.run([*base, "--import", str(key)], capture_output=True, check=False)
        if imp.returncode != 0:
            return Verdict(imported=False, returncode=imp.returncode, keywords=frozenset())
        res = subprocess.run([*base, "--status-fd", "1", "--verify", str(signature), str(signed)],
                             capture_output=True, text=True, check=False)
    status = [line.split() for line in res.stdout.splitlines() if line.startswith("[GNUPG:] ")]
    keywords = frozenset(fields[1] for fields in status if len(fields) > 1)
    valid = next((fields for fields in status if len(fields) > 2 and fields[1] == "VALIDSIG"), None)
    return Verdict(
        imported=True,
        returncode=res.returncode,
        keywords=keywords,
        # VALIDSIG <signing key fpr> <date> ... <primary key fpr>: the primary is the last field.
        signing_key=valid[2].upper() if valid else None,
        primary_key=valid[-1].upper() if valid else None,
    )
