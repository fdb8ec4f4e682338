"""The one place that hides secrets from text: config errors, ``repr``, log lines, error messages.

Two rules, applied wherever text leaves the process:

- ``scrub(text)``: every ``user:pass@`` credential is replaced by ``***:***@`` — in a URL with a scheme
  (``rtsp://u:p@h``; a scheme's userinfo is scrubbed even without a password) and without one
  (``u:p@host/x``, which ``urlsplit`` does not parse as credentials).
- ``is_secret_key(key)``: a key that looks like a secret, whatever its spelling (``password``, ``passwd``,
  ``passwrd``, ``pwd``, ``token``, ``tokn``, ``secret``, ``api_key``, ``auth``, ``credentials``...):
  a substring from a list of stems, or a close misspelling (difflib ratio >= 0.75) of a known secret word.
  Values of such keys are shown as ``***``. Over-redacting an unknown key costs nothing; leaking a
  password in a config error does.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

__all__ = ["REDACTED", "is_secret_key", "redact_value", "scrub"]

REDACTED = "***"

# userinfo after a scheme: up to the LAST '@' before the path (a password may contain '@').
_SCHEME_CRED = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s\"'<>]*@")
# user:pass@ without a scheme (the user part must not contain '/', so paths like a/b:c@d are skipped).
_BARE_CRED = re.compile(r"(?<![\w.+-])[^\s/@:\"'<>=,;()\[\]{}]+:[^\s/\"'<>]*@(?=[\w\[])")

_SECRET_STEMS = ("pass", "pwd", "passw", "secret", "secr", "token", "tokn", "tkn", "apikey", "key",
                 "auth", "cred", "private", "priv", "cookie", "bearer", "signature", "salt")
_SECRET_WORDS = ("password", "passwd", "passphrase", "token", "secret", "apikey", "credential", "credentials",
                 "bearer", "privatekey")
_PW_RE = re.compile(r"(^|_)pw(_|$|d)")


def scrub(text: str) -> str:
    """``text`` with every ``user:pass@`` credential (with or without a scheme) replaced by ``***:***@``."""
    if "@" not in text:
        return text
    text = _SCHEME_CRED.sub(r"\g<scheme>***:***@", text)
    return _BARE_CRED.sub("***:***@", text)


def is_secret_key(key: str) -> bool:
    """True for keys whose values must never be shown (any spelling of password, token, secret...)."""
    leaf = str(key).rsplit(".", 1)[-1].lower()
    if _PW_RE.search(leaf):
        return True
    flat = re.sub(r"[^a-z]", "", leaf)
    if not flat:
        return False
    if any(stem in flat for stem in _SECRET_STEMS):
        return True
    return any(difflib.SequenceMatcher(None, flat, w).ratio() >= 0.75 for w in _SECRET_WORDS)


def redact_value(key: str, value: Any) -> Any:
    """``***`` for a non-empty value of a secret-looking key; a string with its credentials scrubbed;
    anything else unchanged."""
    if is_secret_key(key) and value not in ("", None):
        return REDACTED
    if isinstance(value, str):
        return scrub(value)
    return value
