"""Checking what the operator gives `genforge serve`: API keys, memory sizes, the listen address.

Each check fails with a ConfigError naming the flag, so a typo stops the server at start-up
instead of silently turning a protection off: an empty key is an error (not "auth off"), a key
file without keys is an error, and serving beyond loopback without any key is warned about.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from genforge.common.errors import ConfigError

KEYS_ENV = "GENFORGE_API_KEYS"  # comma-separated
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def check_keys(keys: list[str], where: str) -> list[str]:
    """Keys stripped of surrounding whitespace; an empty one is an error naming `where`."""
    out = []
    for k in keys:
        if not k.strip():
            raise ConfigError(f"{where}: an API key is empty; give a non-empty key, or leave the option out "
                              f"to serve without authentication", param="api_key")
        out.append(k.strip())
    return out


def read_key_file(path: str | Path) -> list[str]:
    """Keys from a file, one per line (blank lines and lines starting with # skipped)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--api-key-file {path}: cannot read it ({e.strerror})", param="api_key_file") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ConfigError(f"--api-key-file {path}: the file holds no key (one key per line)", param="api_key_file")
    return keys


def resolve_api_keys(flag_keys: list[str] | None, key_file: str | None, env: dict[str, str]) -> list[str]:
    """All keys from --api-key, --api-key-file and GENFORGE_API_KEYS (set but empty is an error)."""
    keys = check_keys(list(flag_keys or []), "--api-key")
    if key_file:
        keys += read_key_file(key_file)
    if KEYS_ENV in env:
        keys += check_keys(env[KEYS_ENV].split(","), KEYS_ENV)
    return keys


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def exposure_warning(host: str, keys: list[str]) -> str | None:
    """The warning to print when the API is reachable from other machines without a key."""
    if keys or is_loopback(host):
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this address can use the "
            f"model; pass --api-key-file (or --api-key / {KEYS_ENV}), or --host 127.0.0.1")


def parse_bytes(text: str | int, flag: str = "--kv-cache-memory") -> int:
    """'512MiB', '2GB', '1.5GiB' or a plain byte count -> bytes (> 0)."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(str(text))
        unit = (m.group(2) or "").lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ConfigError(f"{flag}: {text!r} is not a size; write e.g. 512MiB, 2GiB, 4GB or a byte count",
                              param=flag.lstrip("-").replace("-", "_"))
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"{flag}: {text!r} must be more than 0 bytes", param=flag.lstrip("-").replace("-", "_"))
    return value
