"""API key material: the token format, hashing and verification.

A token reads ``dais_<key id>_<secret><checksum>``: a fixed prefix that
secret scanners can look for, the public key id (16 hex digits), a 32
character base62 secret and a 6 character base62 CRC-32 of everything before
it. A mistyped token fails its checksum and is refused without a store
lookup. Only the SHA-256 of the secret is stored; the secret has about 190
bits of entropy, so a fast hash is enough, and it is compared in constant
time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from collections.abc import Callable

import attrs

from dais_core.errors import InvalidData, Unauthenticated

__all__ = [
    "ADMIN_PREFIX",
    "SESSION_PREFIX",
    "TOKEN_PREFIX",
    "NewKey",
    "hash_secret",
    "holds_secret",
    "holds_token",
    "key_id_of",
    "new_key",
    "parse_token",
    "secret_matches",
    "shown",
]

TOKEN_PREFIX = "dais"
#: The prefix of admin tokens, which are never accepted as API keys.
ADMIN_PREFIX = "daisadm"
#: The prefix of admin browser sessions, which are no admin tokens either.
SESSION_PREFIX = "daisses"
_WHAT = {ADMIN_PREFIX: "admin token", SESSION_PREFIX: "session"}
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SECRET_LENGTH = 32
#: The id of a token between its underscores: text holding one may hold a
#: secret (glued to other text, or broken by a space), so it is never
#: repeated back. A fixed-width run, so a search takes linear time.
_SECRET_LIKE = re.compile(r"_[0-9a-f]{16}_")
#: A long run of base62 characters, which a secret mixes the case of (one
#: of 38 characters without both cases is about one in a billion); hex ids
#: and ULIDs keep to one case.
_BASE62_RUN = re.compile(r"[0-9A-Za-z]{24,}")
_TOKEN = re.compile(
    r"(?P<prefix>[a-z]+)_(?P<id>[0-9a-f]{16})_"
    rf"(?P<secret>[0-9A-Za-z]{{{_SECRET_LENGTH}}})(?P<check>[0-9A-Za-z]{{6}})"
)


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), 6)


@attrs.frozen
class NewKey:
    """A freshly made key: the token to show once, and what to store."""

    id: str
    token: str = attrs.field(repr=False)
    secret_hash: str = attrs.field(repr=False)


def new_key(
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    prefix: str = TOKEN_PREFIX,
) -> NewKey:
    """Make a new key id, secret and token.

    Args:
        random_bytes: The source of randomness; the default is the OS's CSPRNG.
        prefix: :data:`TOKEN_PREFIX` for API keys, :data:`ADMIN_PREFIX` for
            admin tokens, :data:`SESSION_PREFIX` for admin sessions.
    """
    key_id = random_bytes(8).hex()
    secret = "".join(_ALPHABET[b % 62] for b in _unbiased(random_bytes, _SECRET_LENGTH))
    body = f"{prefix}_{key_id}_{secret}"
    return NewKey(key_id, body + _checksum(body), hash_secret(secret))


def _unbiased(random_bytes: Callable[[int], bytes], count: int) -> list[int]:
    # Rejection sampling: bytes >= 248 would favour the first digits.
    picked: list[int] = []
    while len(picked) < count:
        picked.extend(b for b in random_bytes(count) if b < 248)
    return picked[:count]


def hash_secret(secret: str) -> str:
    """Return the stored form of a secret: its SHA-256, hex."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse_token(token: str, prefix: str = TOKEN_PREFIX) -> tuple[str, str]:
    """Split a token into its key id and secret, checking its form first.

    Raises:
        Unauthenticated: The token is not of the dais form or its checksum
            does not match.
    """
    what = _WHAT.get(prefix, "API key")
    found = _TOKEN.fullmatch(token)
    if found is None or found["prefix"] != prefix:
        raise Unauthenticated(f"the {what} is malformed")
    body = token[: found.start("check")]
    if not hmac.compare_digest(_checksum(body), found["check"]):
        raise Unauthenticated(f"the {what} is malformed")
    return found["id"], found["secret"]


def key_id_of(text: str, prefix: str = TOKEN_PREFIX) -> str:
    """Return the id that ``text`` names: itself, or a whole token's id.

    An operator revoking a leaked key may paste the whole key rather than
    its id, with a stray space, a line break or ``Bearer `` around it: the
    id is taken from it, so that the secret goes no further (into no
    message, log line or audit record).

    Args:
        text: An id, or a whole token.
        prefix: :data:`TOKEN_PREFIX` for API keys, :data:`ADMIN_PREFIX` for
            admin tokens.

    Raises:
        InvalidData: ``text`` holds what looks like a secret but is no
            well-formed token of that kind (the message does not repeat it).
    """
    if not holds_secret(text):
        return text
    candidate = text.strip()
    if candidate[:7].lower() == "bearer ":
        candidate = candidate[7:].strip()
    try:
        return parse_token(candidate, prefix)[0]
    except Unauthenticated:
        what = _WHAT.get(prefix, "API key")
        raise InvalidData(f"that is no id, nor a well-formed {what}") from None


def holds_token(text: str) -> bool:
    """Return whether ``text`` holds a token's id between its underscores."""
    return _SECRET_LIKE.search(text) is not None


def holds_secret(text: str) -> bool:
    """Return whether ``text`` holds something shaped like a key or token.

    That is a token's id between its underscores, or a long run of letters
    and digits in both cases, like a secret (broken off by a space, say).
    """
    if holds_token(text):
        return True
    return any(
        not run.isupper() and not run.islower() and not run.isdigit()
        for run in _BASE62_RUN.findall(text)
    )


def shown(text: str) -> str:
    """Return ``text`` quoted for a message, unless it may hold a secret."""
    return "that value" if holds_secret(text) else repr(text)


def secret_matches(secret: str, secret_hash: str) -> bool:
    """Compare a presented secret with a stored hash in constant time."""
    return hmac.compare_digest(hash_secret(secret), secret_hash)
