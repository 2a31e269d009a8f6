"""API key tokens, hashing and verification (dais_core.keys)."""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dais_core.errors import InvalidData, Unauthenticated
from dais_core.keys import (
    ADMIN_PREFIX,
    TOKEN_PREFIX,
    hash_secret,
    holds_secret,
    key_id_of,
    new_key,
    parse_token,
    secret_matches,
)
from dais_core.values import ApiKey

TOKEN_SHAPE = re.compile(r"dais_[0-9a-f]{16}_[0-9A-Za-z]{32}[0-9A-Za-z]{6}")


def _source(*blocks: bytes) -> Callable[[int], bytes]:
    """Return a random_bytes stand-in that hands out ``blocks`` in order."""
    queue: Iterator[bytes] = iter(blocks)

    def random_bytes(count: int) -> bytes:
        block = next(queue)
        assert len(block) == count
        return block

    return random_bytes


def _key(id_byte: int = 0xAB, secret_byte: int = 7):
    return new_key(_source(bytes([id_byte]) * 8, bytes([secret_byte]) * 32))


# A fixed token with letters in its id and no repeated neighbours in its secret.
TOKEN = new_key(_source(bytes(range(0xA0, 0xA8)), bytes(range(32)))).token


class TestNewKey:
    def test_token_has_the_documented_shape(self):
        """A token reads dais_<16 hex id>_<32 base62 secret><6 base62 checksum>."""
        key = new_key()
        assert TOKEN_SHAPE.fullmatch(key.token)
        assert key.token.startswith(f"{TOKEN_PREFIX}_{key.id}_")

    def test_the_token_parses_back_to_its_id_and_secret(self):
        """parse_token returns the id and the secret whose hash is stored."""
        key = new_key()
        key_id, secret = parse_token(key.token)
        assert key_id == key.id
        assert hash_secret(secret) == key.secret_hash

    def test_uses_the_given_randomness(self):
        """The id is the hex of the first 8 random bytes; the secret maps bytes mod 62."""
        key = _key(id_byte=0xAB, secret_byte=7)
        assert key.id == "ab" * 8
        assert parse_token(key.token) == ("ab" * 8, "7" * 32)

    def test_bytes_that_would_bias_the_secret_are_skipped(self):
        """Bytes of 248 and above are drawn again, never folded onto low digits."""
        source = _source(b"\x01" * 8, b"\xff" * 16 + b"\x00" * 16, b"\x3d" * 32)
        _, secret = parse_token(new_key(source).token)
        assert secret == "0" * 16 + "z" * 16

    def test_two_keys_differ(self):
        """Fresh keys from the OS's randomness have different ids and secrets."""
        first, second = new_key(), new_key()
        assert first.id != second.id
        assert first.secret_hash != second.secret_hash

    def test_repr_shows_neither_token_nor_hash(self):
        """Printing a new key never reveals its token or stored hash."""
        key = new_key()
        assert key.token not in repr(key)
        assert key.secret_hash not in repr(key)


class TestHashSecret:
    def test_is_the_sha256_of_the_secret_without_the_secret_in_it(self):
        """The stored form is the SHA-256 hex of the secret and holds no secret."""
        key = new_key()
        _, secret = parse_token(key.token)
        assert key.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in key.secret_hash
        assert key.token not in key.secret_hash

    def test_a_stored_key_does_not_print_its_hash(self):
        """ApiKey's repr leaves the hash out."""
        stored = ApiKey("ab" * 8, hash_secret("s" * 32), "p1")
        assert hash_secret("s" * 32) not in repr(stored)


class TestSecretMatches:
    def test_matches_only_its_own_secret(self):
        """The right secret matches its hash; any other secret does not."""
        stored = hash_secret("A" * 32)
        assert secret_matches("A" * 32, stored)
        assert not secret_matches("A" * 31 + "B", stored)


class TestParseToken:
    @pytest.mark.parametrize(
        "token",
        [
            "",
            "dais_",
            TOKEN[:-1],
            TOKEN + "0",
            "DAIS" + TOKEN[4:],
            "sk_" + TOKEN[5:],
            TOKEN.replace("_", "-"),
            TOKEN[:5] + TOKEN[5:21].upper() + TOKEN[21:],
            f" {TOKEN}",
            f"{TOKEN}\n",
        ],
        ids=[
            "empty",
            "prefix-only",
            "short",
            "long",
            "upper-prefix",
            "other-prefix",
            "dashes",
            "upper-hex-id",
            "leading-space",
            "trailing-newline",
        ],
    )
    def test_refuses_malformed_tokens(self, token):
        """Anything not of the exact dais form is refused as malformed."""
        with pytest.raises(Unauthenticated, match="malformed"):
            parse_token(token)

    @given(st.data())
    def test_any_single_character_typo_is_refused(self, data):
        """Changing one character anywhere fails the form or the checksum."""
        index = data.draw(st.integers(0, len(TOKEN) - 1), label="index")
        typo = data.draw(
            st.sampled_from(string.ascii_letters + string.digits + "_-").filter(
                lambda ch: ch != TOKEN[index]
            ),
            label="typo",
        )
        with pytest.raises(Unauthenticated):
            parse_token(TOKEN[:index] + typo + TOKEN[index + 1 :])

    @given(st.integers(0, len(TOKEN) - 8))
    def test_swapping_two_neighbours_is_refused(self, index):
        """Transposing two different adjacent characters is caught by the checksum."""
        if TOKEN[index] == TOKEN[index + 1]:
            return
        swapped = TOKEN[:index] + TOKEN[index + 1] + TOKEN[index] + TOKEN[index + 2 :]
        with pytest.raises(Unauthenticated):
            parse_token(swapped)

    def test_the_error_never_echoes_the_token(self):
        """A refusal says what is wrong without repeating the key material."""
        with pytest.raises(Unauthenticated) as caught:
            parse_token(TOKEN[:-1] + ("0" if TOKEN[-1] != "0" else "1"))
        assert TOKEN[5:-6] not in str(caught.value.body())


class TestKeyIdOf:
    def test_a_key_id_is_itself(self):
        """An id, or any text not shaped like a secret, is taken as it is."""
        assert key_id_of("a0a1a2a3a4a5a6a7") == "a0a1a2a3a4a5a6a7"
        assert key_id_of("k1") == "k1"

    @pytest.mark.parametrize(
        "text",
        [TOKEN, TOKEN + " ", TOKEN + "\n", "Bearer " + TOKEN, " bearer  " + TOKEN],
        ids=["as-is", "space", "line-break", "bearer", "lower-case-bearer"],
    )
    def test_a_whole_key_gives_its_id(self, text):
        """A pasted key, give or take blanks and 'Bearer', is read as its id."""
        assert key_id_of(text) == parse_token(TOKEN)[0]

    def test_a_whole_admin_token_gives_its_id_when_asked(self):
        """With the admin prefix, an admin token is read as its id."""
        made = new_key(prefix=ADMIN_PREFIX)
        assert key_id_of(made.token, ADMIN_PREFIX) == made.id

    @pytest.mark.parametrize(
        "text",
        [
            TOKEN[:-1] + ("0" if TOKEN[-1] != "0" else "1"),
            new_key(prefix=ADMIN_PREFIX).token,
            TOKEN + "x",
            TOKEN[:-1],
            "no key " + TOKEN,
            "a" * 70 + TOKEN,
            TOKEN[:30] + " " + TOKEN[30:],
            TOKEN[:12] + "\n" + TOKEN[12:],
        ],
        ids=[
            "bad-checksum",
            "admin-token",
            "one-more",
            "one-less",
            "in-a-sentence",
            "glued-to-letters",
            "secret-broken",
            "id-broken",
        ],
    )
    def test_a_secret_that_is_no_api_key_is_refused_unrepeated(self, text):
        """A damaged key or an admin token is refused without being repeated."""
        with pytest.raises(InvalidData) as caught:
            key_id_of(text)
        assert text.split("_")[2][:32] not in str(caught.value.body())


class TestHoldsSecret:
    @pytest.mark.parametrize(
        "text",
        [
            "0123456789abcdef",
            "9f1c2e3d4b5a69788796a5b4c3d2e1f0",
            "01HGW2XQ7Z8YABCDEFGHJKMNPQ",
            "req-1",
        ],
        ids=["key-id", "uuid-hex", "ulid", "short"],
    )
    def test_ids_of_one_case_are_no_secrets(self, text):
        """Hex ids, uuids and ULIDs may be repeated back."""
        assert not holds_secret(text)

    @pytest.mark.parametrize(
        "text",
        [TOKEN, "x" * 100 + TOKEN, TOKEN[:30] + " " + TOKEN[30:], TOKEN[25:]],
        ids=["whole", "glued", "broken", "secret-alone"],
    )
    def test_a_token_or_its_secret_is_found_anywhere(self, text):
        """A whole token, or most of a secret, counts wherever it is."""
        assert holds_secret(text)
