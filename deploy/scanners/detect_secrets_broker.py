"""detect-secrets plugin for the broker's recognisable secrets (docs/leaks.md).

    detect-secrets scan --plugin deploy/scanners/detect_secrets_broker.py --all-files .

Unlike a regex-only rule it also checks the CRC-32, so a right-shaped string with a wrong
checksum (a typo, a made-up example) is not reported. The format:

    brk_<tag>_<32 base62>_<CRC-32 (ISO-HDLC, as zlib) of everything before it, 6 base62 digits>

The legacy operator and revocation tokens (brk_op_/brk_rvk_ + 43 base64url characters, no
checksum) are reported by the second detector.
"""

import re
import zlib

from detect_secrets.plugins.base import RegexBasedDetector

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TAGS = ("op", "rvk", "pg", "my", "rd", "at")


def checksum(body):
    """The CRC-32 of body in 6 base62 digits, most significant first."""
    n = zlib.crc32(body.encode("ascii"))
    digits = []
    for _ in range(6):
        digits.append(BASE62[n % 62])
        n //= 62
    return "".join(reversed(digits))


def well_formed(secret):
    """True when secret is a broker secret whose checksum matches."""
    body, sep, sum_ = secret.rpartition("_")
    return bool(sep) and checksum(body) == sum_


class BrokerSecretDetector(RegexBasedDetector):
    """Broker secret (brk_<tag>_..., checksum verified)."""

    secret_type = "Broker secret"

    denylist = (
        re.compile(
            r"(?<![0-9A-Za-z_])(brk_(?:%s)_[0-9A-Za-z]{32}_[0-4][0-9A-Za-z]{5})(?![0-9A-Za-z_])"
            % "|".join(TAGS)
        ),
    )

    def analyze_string(self, string):
        for match in super().analyze_string(string):
            if well_formed(match):
                yield match


class BrokerLegacyTokenDetector(RegexBasedDetector):
    """Broker operator or revocation token of the legacy shape (no checksum)."""

    secret_type = "Broker legacy token"

    denylist = (
        re.compile(r"(?<![0-9A-Za-z_-])(brk_(?:op|rvk)_[0-9A-Za-z_-]{43})(?![0-9A-Za-z_-])"),
    )
