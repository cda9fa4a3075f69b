"""Secrets out of every line coe prints or logs: the password in a URL (``redis://:pw@host``,
``redis://user:pw@host``, ``?password=pw``), bearer tokens, and any secret the caller names.

Everything that shows an operator's URL or an error text that may quote one goes through here,
so a log shipped to a shared system never carries the store's password or a client's key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# A URL's userinfo with a password: scheme://[user]:password@ (the password ends at the last
# "@" before the host; it may itself hold "@" or ":" when the URL was written unquoted).
_USERINFO_PASSWORD = re.compile(
    r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)(?P<password>[^\s/]*)(?P<at>@)"
)
_BEARER = re.compile(r"(?i)(?P<head>\bbearer\s+)(?P<token>[^\s\"',]+)")
# Query parameters that carry a credential (redis-py reads ?password=).
_SECRET_PARAMS = re.compile(r"(?i)(?P<head>[?&](?:password|passwd|api_key|apikey|token)=)[^&\s]+")


def redact_url(url: str) -> str:
    """``url`` with its password (userinfo or a credential query parameter) masked; the user,
    host, port and path stay, so the line still says where."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{hostport}"
    query = _SECRET_PARAMS.sub(lambda m: m["head"] + MASK, "?" + parts.query)[1:]
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` (an error message, a log line) with URL passwords, bearer tokens and each of
    ``secrets`` (an API key, say) masked wherever they appear."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    text = _USERINFO_PASSWORD.sub(lambda m: m["head"] + MASK + m["at"], text)
    text = _BEARER.sub(lambda m: m["head"] + MASK, text)
    return _SECRET_PARAMS.sub(lambda m: m["head"] + MASK, text)
