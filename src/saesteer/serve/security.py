"""Server security helpers: loopback detection, the bind rule (non-loopback needs a key or ``insecure``),
constant-time key checks with a case-insensitive scheme, and access-log redaction of query strings."""

from __future__ import annotations

import hmac
import ipaddress
import logging

from saesteer.core import SaesteerError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    h = host.strip().strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool = False) -> None:
    """Refuse to listen on a non-loopback interface without an API key unless ``insecure`` (raises SaesteerError)."""
    if not is_loopback(host) and not api_key and not insecure:
        raise SaesteerError(f"refusing to listen on {host} without an API key: anyone who can reach it could use "
                            "the model; pass --api-key KEY (or SAESTEER_API_KEY), or --insecure if you mean it")


def key_matches(header: str | None, api_key: str) -> bool:
    """``Authorization: Bearer KEY`` with any case of the scheme, compared in constant time."""
    scheme, _, token = (header or "").strip().partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    return hmac.compare_digest(token.strip().encode("utf-8", "surrogatepass"), api_key.encode("utf-8")) and ok_scheme


class RedactQuery(logging.Filter):
    """Drop query strings (``?api_key=...``) from uvicorn's access log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = args[:2] + (args[2].split("?", 1)[0] + "?<redacted>",) + args[3:]
        return True


def install_log_redaction() -> None:
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuery) for f in logger.filters):
        logger.addFilter(RedactQuery())
