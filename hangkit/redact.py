"""Keeping secrets out of reports: environments, command lines and free text (job output,
logs) can hold them. Names containing KEY, TOKEN, SECRET or PASSWORD are secret."""

from __future__ import annotations

import re

SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
REDACTED = "<redacted>"
_SECRET_OPTION = re.compile(r"^--?[\w-]*(key|token|secret|password)[\w-]*", re.IGNORECASE)


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
