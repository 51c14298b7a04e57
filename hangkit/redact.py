"""Keeping secrets out of reports: environments, command lines and free text (job output,
logs) can hold them. One function, redact_value, hides them in anything JSON-able: a hang
report as data before any renderer sees it, and each member of a `hangkit report` bundle
(redact_member). What it hides:

- the value of a name that says secret (is_secret_name) in `NAME=value`, `NAME: value` (shell,
  YAML, JSON, Python reprs, connection strings' `Password=...;`), `--name value`,
  `--name=value`, and as a JSON key or an environment variable;
- the password of `scheme://user:password@host`;
- tokens by their shape: Hugging Face, OpenAI, GitHub, GitLab, Slack, AWS access key ids,
  Google API keys, JWTs, `Bearer ...`, a 40-hex key after `wandb login`;
- the literal values of the environment's secret variables, wherever they appear.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")  # the words a README names
REDACTED = "<redacted>"
# A name says secret when one of its parts (split at _ - . and camelCase) ends in KEY or TOKEN
# (API_KEY, apiKey, HF_TOKEN; not tokens_per_second, keyboard, or the words below), contains
# one of _CONTAINED, or when its last part is one of _LAST (db_pw, --pw, MYSQL_PWD, --auth;
# not pwd_dir or SSH_AUTH_SOCK, which name paths).
_ENDED = ("key", "token")
_NOT_KEYS = frozenset({"monkey", "donkey", "turkey", "hockey", "jockey", "whiskey", "lackey",
                       "hotkey", "turnkey"})
_CONTAINED = ("secret", "password", "passwd", "passphrase", "credential", "authorization")
_LAST = frozenset({"pw", "pwd", "auth", "oauth"})
_PART = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# hangkit's own record fields whose names say secret but hold none (RankStatus.key is
# "rank 3"): JSON keys spared from redaction by name.
_RECORD_FIELDS = frozenset({"key"})
# hangkit's own record fields that hold a command line: redacted as one (`--token VALUE`).
_ARGV_FIELDS = frozenset({"command", "cmdline"})
_MIN_SCRUB = 6  # shorter secret values are not scrubbed as literals: they would hit anything
# Names that look secret but are not: exception classes (`KeyError: 'lr'` must stay
# readable) and source files in a location (`tokenizer.py:42`, `key.py:7`).
_NOT_SECRET = re.compile(r"(Error|Exception|Warning|Interrupt|\.pyx?|\.[ch]|\.cc|\.cpp|\.cu)$")


@functools.lru_cache(maxsize=4096)
def _says_secret(name: str) -> bool:
    parts = [p.lower() for p in _PART.findall(name)]
    if not parts or _NOT_SECRET.search(name):
        return False
    return parts[-1] in _LAST or any(
        (p.endswith(_ENDED) and p not in _NOT_KEYS) or any(w in p for w in _CONTAINED)
        for p in parts)


def is_secret_name(name: str, value: str | None = None) -> bool:
    """Whether the value of this variable, option or key is a secret. With its value: PWD,
    the shell's working directory, is not, where its value is a path (an ODBC `PWD=` is)."""
    if not _says_secret(name):
        return False
    return not (value and name.strip("-").lower() == "pwd" and value.startswith(("/", "~")))


def redact_environ(env: Mapping[str, str]) -> dict[str, str]:
    """Variables whose names say secret, hidden whole (the rest is free text: redact_value)."""
    return {k: (REDACTED if is_secret_name(k, v) else v) for k, v in env.items()}


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line: the value after an option whose name says secret (`--api-key VALUE`,
    `--pw VALUE`) hidden, and every argument redacted as text (`--token=VALUE`,
    `NAME_KEY=VALUE`, URLs, token shapes)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        before = argv[i - 1] if i else ""
        if (before.startswith("-") and "=" not in before and not arg.startswith("--")
                and is_secret_name(before, arg)):
            out.append(REDACTED)
        else:
            out.append(redact_text(arg))
    return out


# Free text: job output, logs, config files. A candidate name holds one of these; whether it
# says secret is decided by is_secret_name (`monkey=3` is a candidate, left as it is).
_CANDIDATE = (r"[A-Za-z0-9_.-]*(?:key|token|secret|passw|passphrase|credential|auth|pw)"
              r"[A-Za-z0-9_.-]*")
_SCHEME = r"(?P<scheme>(?:Basic|Bearer|Digest|Token)[ \t]+)?"  # Authorization: Bearer VALUE
_VALUE = r"\"(?:[^\"\\\n]|\\.)*\"|'[^'\n]*'|\S+"
# NAME=value, NAME: value, "NAME": "value", 'name' = 'value', Password=value; (a connection
# string's value ends at whitespace: what follows the ; is hidden too, erring on hiding)
_ASSIGNMENT = re.compile(r"(?<![A-Za-z0-9_.-])(?P<name>" + _CANDIDATE + r")(?P<quote>[\"']?)"
                         r"(?P<sep>[ \t]*[=:][ \t]*)" + _SCHEME + r"(?P<value>" + _VALUE + r")",
                         re.IGNORECASE)
# --api-key VALUE (the `--api-key=VALUE` form is an assignment above)
_OPTION = re.compile(r"(?<![\w-])(?P<name>--?" + _CANDIDATE + r")(?P<sep>[ \t]+)"
                     r"(?P<value>(?!-)\S+)", re.IGNORECASE)
# scheme://user:password@host: the password runs to the authority's last @
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s/?#@:]*:)[^\s/?#]+"
                           r"(?=@[^\s/?#@]*(?:[/?#\s]|$))", re.IGNORECASE)
# Tokens by their shape, their prefix kept (it says what was there); long enough that words
# and identifiers (hf_hub_download, sk-learn, a git sha) are not hit.
_SHAPES = re.compile(r"""(?<![A-Za-z0-9_-])(?:
      (?P<hf>hf_)[A-Za-z0-9]{20,}
    | (?P<openai>sk-(?:proj-|ant-|svcacct-|admin-)?)[A-Za-z0-9_-]{20,}
    | (?P<github>gh[pousr]_)[A-Za-z0-9]{20,}
    | (?P<github_pat>github_pat_)[A-Za-z0-9_]{20,}
    | (?P<gitlab>glpat-)[A-Za-z0-9_-]{20,}
    | (?P<slack>xox[abposr]-)[A-Za-z0-9-]{10,}
    | (?P<aws>A(?:KIA|SIA))[0-9A-Z]{16}(?![0-9A-Za-z])
    | (?P<google>AIza)[0-9A-Za-z_-]{35}
    | (?P<jwt>eyJ)[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*
    | (?P<bearer>Bearer[ \t]+)[A-Za-z0-9._~+/=-]{8,}
    | (?P<wandb>wandb[ \t]+login(?:[ \t]+--?[a-z-]+)*[ \t]+)[0-9a-f]{40}(?![0-9a-f])
    )""", re.VERBOSE)


def redact_text(text: str) -> str:
    """Hides secrets in free text: the value of `NAME=value`, `NAME: value` (quoted or not, as
    in shell, YAML, JSON and Python reprs) and `--name value` where NAME says secret
    (is_secret_name); the password of `scheme://user:password@host`; and tokens by their
    shape. Errs on hiding too much: `token_budget: 1024` loses its number."""
    return _redact_short(text) if len(text) <= _CACHED_LENGTH else _redact(text)


def _redact(text: str) -> str:
    def assignment(m: re.Match) -> str:
        value = m["value"]
        quote = value[0] if value[0] in "\"'" and len(value) > 1 and value[-1] == value[0] else ""
        if not is_secret_name(m["name"], value.strip(quote) if quote else value):
            return m[0]
        return m["name"] + m["quote"] + m["sep"] + (m["scheme"] or "") + quote + REDACTED + quote

    def option(m: re.Match) -> str:
        if not is_secret_name(m["name"], m["value"]):
            return m[0]
        return m["name"] + m["sep"] + REDACTED

    text = _ASSIGNMENT.sub(assignment, text)
    text = _OPTION.sub(option, text)
    text = _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, text)
    return _SHAPES.sub(lambda m: m[m.lastgroup] + REDACTED, text)


# A report repeats its strings (frames, files, the same stack on every rank): short ones are
# redacted once. Long ones (a progress bar's megabyte line) are not kept.
_CACHED_LENGTH = 1024
_redact_short = functools.lru_cache(maxsize=1 << 15)(_redact)


def redact_value(value: Any, secrets: Sequence[str] = ()) -> Any:
    """The one redaction of anything JSON-able (a hang report's to_json(), a bundle's JSON
    member): every string redacted as text, the string value of a key that says secret
    hidden whole (hangkit's own `key` spared), a record's command line (`command`,
    `cmdline`) redacted as one, and then `secrets` (secret_values) scrubbed wherever they
    are. Returns a copy; dict keys are kept."""
    if isinstance(value, str):
        return _scrub(redact_text(value), secrets)
    if isinstance(value, (list, tuple)):
        return [redact_value(v, secrets) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                out[k] = redact_value(v, secrets)
            elif k in _ARGV_FIELDS and isinstance(v, list) and all(isinstance(a, str)
                                                                   for a in v):
                out[k] = [_scrub(a, secrets) for a in redact_argv(v)]
            elif isinstance(v, str) and v and k not in _RECORD_FIELDS and is_secret_name(k, v):
                out[k] = REDACTED
            else:
                out[k] = redact_value(v, secrets)
        return out
    return value


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def secret_values(environ: Mapping[str, str]) -> list[str]:
    """The values of this environment's secret variables, to scrub wherever they appear.
    Short values and paths are left alone: scrubbing "1" or "/home/me" would hit anything."""
    found = {v for k, v in environ.items()
             if is_secret_name(k) and len(v) >= _MIN_SCRUB and not v.startswith(("/", "~"))
             and v != REDACTED}
    return sorted(found, key=len, reverse=True)  # longest first: one may contain another


# Whole files: what `hangkit report` puts in its bundle.

def redact_member(name: str, data: bytes | str,
                  secrets: Sequence[str] = ()) -> bytes | str:
    """One member's content with its secrets hidden; unchanged (the same bytes) if it has none.
    JSON is redacted value by value (redact_value) so its structure survives; anything else
    line by line as text."""
    text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
    redacted = None
    if name.endswith(".json"):
        try:
            document = json.loads(text)
        except ValueError:
            pass
        else:
            cleaned = redact_value(document, secrets)
            redacted = text if cleaned == document else json.dumps(cleaned, indent=2) + "\n"
    if redacted is None:
        redacted = "".join(redact_text(line) for line in text.splitlines(keepends=True))
    for secret in secrets:
        for form in dict.fromkeys((secret, json.dumps(secret)[1:-1])):
            redacted = redacted.replace(form, REDACTED)
    if redacted == text:
        return data
    return redacted.encode("utf-8", "surrogateescape") if isinstance(data, bytes) else redacted
