"""API keys: only their SHA-256 is held, in experts.yaml (gateway.api_keys) or derived at start
from the plaintext keys in $COE_API_KEYS. With no keys at all the gateway is open (local use).

A plaintext key from $COE_API_KEYS must be at least MIN_KEY_LENGTH characters: a short key can be
guessed, and an operator who typed "test" there would not notice. `coe keys new` makes keys of
47. (Keys in experts.yaml are hashes; their length cannot be told, so `coe keys new` is the rule.)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from coe.config import ApiKey, RateLimits
from coe.errors import ConfigurationError

API_KEYS_ENV = "COE_API_KEYS"
KEY_PREFIX = "coe-"
MIN_KEY_LENGTH = 32


class ShortKeyError(ConfigurationError):
    """A key in $COE_API_KEYS is too short to keep anyone out. The message names the variable
    and the key's position, never the key."""

    def __init__(self, position: int, count: int, length: int):
        super().__init__(
            f"${API_KEYS_ENV}: key {position} of {count} is {length} characters long; keys must "
            f"have at least {MIN_KEY_LENGTH} (make one with `coe keys new --name NAME`)"
        )


@dataclass(frozen=True)
class Client:
    """Who sent a request: the key's name (or the peer address when keys are off) and limits."""

    subject: str
    limits: RateLimits


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    def __init__(self, keys: list[ApiKey], default_limits: RateLimits):
        self.default_limits = default_limits
        self._by_hash = {k.sha256: k for k in keys}

    @classmethod
    def from_settings(
        cls, keys: list[ApiKey], default_limits: RateLimits, env: str | None = None
    ) -> KeyRing:
        """Keys from the config plus the comma-separated plaintext keys in ``env``; a key
        there shorter than MIN_KEY_LENGTH raises ShortKeyError."""
        plain = [k.strip() for k in (env or "").split(",") if k.strip()]
        for i, key in enumerate(plain):
            if len(key) < MIN_KEY_LENGTH:
                raise ShortKeyError(i + 1, len(plain), len(key))
        extra = [ApiKey(name=f"env-{i + 1}", sha256=hash_key(k)) for i, k in enumerate(plain)]
        return cls([*keys, *extra], default_limits)

    @property
    def required(self) -> bool:
        return bool(self._by_hash)

    def identify(self, authorization: str | None, peer: str) -> Client | None:
        """The client for an Authorization header; None when a key is required and not valid."""
        if not self.required:
            return Client(subject=f"peer:{peer}", limits=self.default_limits)
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        digest = hash_key(authorization[7:].strip())
        for known, key in self._by_hash.items():
            # Constant time: a timing side channel must not reveal how much of a hash matched.
            if hmac.compare_digest(known, digest):
                return Client(subject=f"key:{key.name}", limits=key.limits or self.default_limits)
        return None


def env_keys() -> str | None:
    return os.environ.get(API_KEYS_ENV)
