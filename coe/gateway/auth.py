"""API keys: only their SHA-256 is held, in experts.yaml (gateway.api_keys) or derived at start
from the plaintext keys in $COE_API_KEYS (admin keys: $COE_ADMIN_KEYS). With no keys at all the
gateway is open (local use), and only clients on loopback may use /admin.

A plaintext key from $COE_API_KEYS must be at least MIN_KEY_LENGTH characters: a short key can be
guessed, and an operator who typed "test" there would not notice. `coe keys new` makes keys of
47. (Keys in experts.yaml are hashes; their length cannot be told, so `coe keys new` is the rule.)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass

from coe.config import ApiKey, GatewaySettings, RateLimits
from coe.errors import ConfigurationError

API_KEYS_ENV = "COE_API_KEYS"
ADMIN_KEYS_ENV = "COE_ADMIN_KEYS"
KEY_PREFIX = "coe-"
MIN_KEY_LENGTH = 32


class ShortKeyError(ConfigurationError):
    """A key in $COE_API_KEYS is too short to keep anyone out. The message names the variable
    and the key's position, never the key."""

    def __init__(self, position: int, count: int, length: int, variable: str = API_KEYS_ENV):
        super().__init__(
            f"${variable}: key {position} of {count} is {length} characters long; keys must "
            f"have at least {MIN_KEY_LENGTH} (make one with `coe keys new --name NAME`)"
        )


@dataclass(frozen=True)
class Client:
    """Who sent a request: the key's name (or the peer address when keys are off) and limits."""

    subject: str
    limits: RateLimits
    # May use /admin (reload the pool, load adapters): a key with `admin: true`, or, on a
    # gateway without keys, a client on this machine (loopback).
    admin: bool = False


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
        cls,
        keys: list[ApiKey],
        default_limits: RateLimits,
        env: str | None = None,
        admin_env: str | None = None,
    ) -> KeyRing:
        """Keys from the config plus the comma-separated plaintext keys in ``env`` (clients)
        and ``admin_env`` (admin keys); a key there shorter than MIN_KEY_LENGTH raises
        ShortKeyError."""
        extra = [
            ApiKey(name=f"{prefix}-{i + 1}", sha256=hash_key(k), admin=admin)
            for prefix, text, admin, variable in (
                ("env", env, False, API_KEYS_ENV),
                ("admin-env", admin_env, True, ADMIN_KEYS_ENV),
            )
            for i, k in enumerate(_plain_keys(text, variable))
        ]
        return cls([*keys, *extra], default_limits)

    @classmethod
    def for_gateway(cls, settings: GatewaySettings) -> KeyRing:
        """The gateway's keys: experts.yaml's gateway.api_keys and the environment's."""
        return cls.from_settings(settings.api_keys, settings.limits, env_keys(), env_admin_keys())

    @property
    def required(self) -> bool:
        return bool(self._by_hash)

    def identify(self, authorization: str | None, peer: str) -> Client | None:
        """The client for an Authorization header; None when a key is required and not valid."""
        if not self.required:
            loopback = is_loopback_address(peer)
            return Client(subject=f"peer:{peer}", limits=self.default_limits, admin=loopback)
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        digest = hash_key(authorization[7:].strip())
        for known, key in self._by_hash.items():
            # Constant time: a timing side channel must not reveal how much of a hash matched.
            if hmac.compare_digest(known, digest):
                limits = key.limits or self.default_limits
                return Client(subject=f"key:{key.name}", limits=limits, admin=key.admin)
        return None


def _plain_keys(text: str | None, variable: str) -> list[str]:
    plain = [k.strip() for k in (text or "").split(",") if k.strip()]
    for i, key in enumerate(plain):
        if len(key) < MIN_KEY_LENGTH:
            raise ShortKeyError(i + 1, len(plain), len(key), variable)
    return plain


def is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def env_keys() -> str | None:
    return os.environ.get(API_KEYS_ENV)


def env_admin_keys() -> str | None:
    return os.environ.get(ADMIN_KEYS_ENV)
