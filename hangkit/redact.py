"""Keeping secrets out of reports: environments, command lines and free text (job output,
logs) can hold them. Names containing KEY, TOKEN, SECRET or PASSWORD are secret. Whole files
(the members of a `hangkit report` bundle) go through redact_member."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
REDACTED = "<redacted>"
_SECRET_OPTION = re.compile(r"^--?[\w-]*(key|token|secret|password)[\w-]*", re.IGNORECASE)
# hangkit's own record fields whose names contain a secret word but hold no secret
# (RankStatus.key is "rank 3"): JSON keys spared from redaction by name.
_RECORD_FIELDS = frozenset({"key"})
_MIN_SCRUB = 6  # shorter secret values are not scrubbed as literals: they would hit anything


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS)


def redact_environ(env: dict[str, str]) -> dict[str, str]:
    return {k: (REDACTED if is_secret_name(k) else v) for k, v in env.items()}


def redact_argv(argv: list[str]) -> list[str]:
    """Hides the value of options such as --api-key VALUE, --token=VALUE, and NAME_KEY=VALUE."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        m = _SECRET_OPTION.match(arg)
        if m and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=" + REDACTED)
        elif m:
            out.append(arg)
            hide_next = True
        elif "=" in arg and not arg.startswith("-") and is_secret_name(arg.split("=", 1)[0]):
            out.append(arg.split("=", 1)[0] + "=" + REDACTED)
        else:
            out.append(arg)
    return out


# Free text: job output, logs, config files.
_WORDS = "|".join(re.escape(w) for w in SECRET_WORDS)
_NAME = r"[A-Za-z0-9_.-]*(?:" + _WORDS + r")[A-Za-z0-9_.-]*"
_VALUE = r"\"(?:[^\"\\\n]|\\.)*\"|'[^'\n]*'|\S+"
# NAME=value, NAME: value, "NAME": "value", 'name' = 'value'
_ASSIGNMENT = re.compile(r"(?P<name>" + _NAME + r")(?P<quote>[\"']?)(?P<sep>[ \t]*[=:][ \t]*)"
                         r"(?P<value>" + _VALUE + r")", re.IGNORECASE)
# --api-key VALUE (the `--api-key=VALUE` form is an assignment above)
_OPTION = re.compile(r"(?<![\w-])(?P<name>--?" + _NAME + r")(?P<sep>[ \t]+)(?P<value>(?!-)\S+)",
                     re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s/:@]+:)[^\s/@]+(?=@)",
                           re.IGNORECASE)
_BEARER = re.compile(r"(?P<head>\bBearer[ \t]+)[A-Za-z0-9._~+/=-]{8,}")
# Names that look secret but are exception classes (`KeyError: 'lr'` must stay readable).
_NOT_SECRET = re.compile(r"(Error|Exception|Warning|Interrupt)$")


def redact_text(text: str) -> str:
    """Hides secrets in free text: the value of `NAME=value`, `NAME: value` (quoted or not, as
    in shell, YAML, JSON and Python reprs) and `--name value` where NAME contains KEY, TOKEN,
    SECRET or PASSWORD in any case; the password of `scheme://user:password@host`; and
    `Bearer TOKEN`. Errs on hiding too much: `tokens: 1024` loses its number."""

    def assignment(m: re.Match) -> str:
        if _NOT_SECRET.search(m["name"]):
            return m[0]
        value = m["value"]
        quote = value[0] if value[0] in "\"'" and len(value) > 1 and value[-1] == value[0] else ""
        return m["name"] + m["quote"] + m["sep"] + quote + REDACTED + quote

    text = _ASSIGNMENT.sub(assignment, text)
    text = _OPTION.sub(lambda m: m["name"] + m["sep"] + REDACTED, text)
    text = _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, text)
    return _BEARER.sub(lambda m: m["head"] + REDACTED, text)


# Whole files: what `hangkit report` puts in its bundle.

def redact_json(value: Any) -> Any:
    """Strings redacted as text; the value of a key named like a secret hidden whole."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [redact_json(v) for v in value]
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and k not in _RECORD_FIELDS
                    and is_secret_name(k) and isinstance(v, str) and v else redact_json(v))
                for k, v in value.items()}
    return value


def secret_values(environ: Mapping[str, str]) -> list[str]:
    """The values of this environment's secret variables, to scrub wherever they appear.
    Short values and paths are left alone: scrubbing "1" or "/home/me" would hit anything."""
    found = {v for k, v in environ.items()
             if is_secret_name(k) and len(v) >= _MIN_SCRUB and not v.startswith(("/", "~"))
             and v != REDACTED}
    return sorted(found, key=len, reverse=True)  # longest first: one may contain another


def redact_member(name: str, data: bytes | str,
                  secrets: Sequence[str] = ()) -> bytes | str:
    """One member's content with its secrets hidden; unchanged (the same bytes) if it has none.
    JSON is redacted value by value so its structure survives; anything else as text."""
    text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
    redacted = None
    if name.endswith(".json"):
        try:
            document = json.loads(text)
        except ValueError:
            pass
        else:
            cleaned = redact_json(document)
            redacted = text if cleaned == document else json.dumps(cleaned, indent=2) + "\n"
    if redacted is None:
        redacted = "".join(redact_text(line) for line in text.splitlines(keepends=True))
    for secret in secrets:
        for form in dict.fromkeys((secret, json.dumps(secret)[1:-1])):
            redacted = redacted.replace(form, REDACTED)
    if redacted == text:
        return data
    return redacted.encode("utf-8", "surrogateescape") if isinstance(data, bytes) else redacted
