"""API keys: only their SHA-256 is held, in experts.yaml (gateway.api_keys) or derived at start
from the plaintext keys in $COE_API_KEYS. With no keys at all the gateway is open (local use)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from coe.config import ApiKey, RateLimits

API_KEYS_ENV = "COE_API_KEYS"
KEY_PREFIX = "coe-"


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
        """Keys from the config plus the comma-separated plaintext keys in ``env``."""
        plain = [k.strip() for k in (env or "").split(",") if k.strip()]
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
