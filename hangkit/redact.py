"""Keeping secrets out of reports: stacks, environments and command lines can hold them."""

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
