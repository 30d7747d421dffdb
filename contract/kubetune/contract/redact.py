"""What an error message may show of text kubetune does not control: data files, servers' answers.

Errors end up in places other people read: a job's status and Failed condition, Events, pod logs (which
Ray copies into the RayJob's message), results.json and the report. So they name columns, fields and row
numbers, and never a file's contents: a one-line file may be a token. Where something outside kubetune's
own words must be shown (a field name, a server's error message), it goes through here first:

- `identifier`: a name (a template field, a mapped column, a key) as a repr-escaped, length-capped string;
- `excerpt`: a bounded, escaped excerpt of foreign text, with the secrets it must never hold (an API key)
  and echoes of the data that was sent (a prompt) blanked out.
"""

from __future__ import annotations

from collections.abc import Iterable

IDENTIFIER_LIMIT = 64  # characters of a name shown in an error
EXCERPT_LIMIT = 200  # characters of foreign text (a server's error message) shown in an error
ECHO_MIN = 8  # a run of at least this many characters found in the data sent counts as an echo of it
SECRET = "<redacted>"
ECHO = "<data>"


def identifier(name: str, limit: int = IDENTIFIER_LIMIT) -> str:
    """`name` quoted and escaped as Python's repr does (control characters, quotes, newlines), at most
    `limit` characters of it: `'mr'`, `'a\\nb'`, `'xxxx'…(+12 chars)`."""
    if len(name) <= limit:
        return repr(name)
    return f"{name[:limit]!r}…(+{len(name) - limit} chars)"


def excerpt(text: str, limit: int = EXCERPT_LIMIT, *, secrets: Iterable[str | None] = (),
            echoes: Iterable[str] = ()) -> str:
    """At most `limit` characters of `text`, escaped, on one line, for an error message.

    Every occurrence of a `secrets` value (an API key) becomes `<redacted>` wherever it is, before the text
    is cut (values shorter than ECHO_MIN characters, such as the placeholder key "none" of a server without
    auth, are left alone); every run of ECHO_MIN or more characters that also occurs in one of `echoes` (the
    prompt that was sent, a row's values) becomes `<data>`. The result is escaped like a repr without its
    quotes: no newline, no control character, no terminal escape.
    """
    for secret in secrets:
        if secret and len(secret) >= ECHO_MIN:
            text = text.replace(secret, SECRET)
    # Blank the echoes within a window a little longer than what is shown, so a cut echo is still found.
    window = text[: limit * 2]
    cut = len(text) > len(window)
    window = _blank_echoes(window, [e for e in echoes if len(e) >= ECHO_MIN])
    shown = window[:limit]
    more = len(window) - len(shown) + (len(text) - limit * 2 if cut else 0)
    escaped = repr(shown)[1:-1]
    return f"{escaped}…(+{more} chars)" if more > 0 else escaped


def _blank_echoes(text: str, echoes: list[str]) -> str:
    """`text` with every run of ECHO_MIN+ characters that occurs in one of `echoes` replaced by `<data>`.

    Probes every ECHO_MIN/2-th position (a run of ECHO_MIN + ECHO_MIN/2 - 1 characters is always hit), then
    grows each hit to the whole run: a few substring searches per probe, for a short `text`.
    """
    if not echoes or len(text) < ECHO_MIN:
        return text
    spans: list[tuple[int, int]] = []
    for probe in range(0, len(text) - ECHO_MIN + 1, ECHO_MIN // 2):
        if spans and probe < spans[-1][1]:
            continue
        source = next((e for e in echoes if text[probe:probe + ECHO_MIN] in e), None)
        if source is None:
            continue
        start, end = probe, probe + ECHO_MIN
        while start > (spans[-1][1] if spans else 0) and text[start - 1:end] in source:
            start -= 1
        while end < len(text) and text[start:end + 1] in source:
            end += 1
        spans.append((start, end))
    out, last = [], 0
    for start, end in spans:
        out += [text[last:start], ECHO]
        last = end
    return "".join([*out, text[last:]])
