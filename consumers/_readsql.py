"""Which SQL the read endpoint runs: exactly one read statement (pure).

The endpoint of the process owning an embedded database (see ``_readserver``) runs every query
in a ``readonly=1`` session, so ClickHouse itself refuses writes. This check comes first and
refuses, before anything runs, what is not one statement starting with ``SELECT``, ``WITH``,
``SHOW``, ``DESCRIBE``, ``DESC``, ``EXISTS`` or ``EXPLAIN``, and ``INTO OUTFILE`` (which writes
a file on the owner's host even in a read-only session of the embedded engine).

The text is split into tokens the way ClickHouse's lexer does where it matters: quoted strings
and identifiers (``'...'``, ``"..."``, backquotes, with ``\\`` escapes and doubled quotes),
heredocs (``$tag$...$tag$``), ``--`` and ``#`` line comments, and ``/* */`` comments (not
nested: a nested comment ends earlier here than in ClickHouse, so the text after it is checked
as SQL and at worst refused). A ``;`` followed by anything but comments is a second statement.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

__all__ = [
    "READ_KEYWORDS",
    "ReadStatement",
    "Refused",
    "check_read",
]

READ_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN"})
"""The first keyword of a statement the endpoint runs."""

READONLY = 164
SYNTAX_ERROR = 62


class Refused(ValueError):
    """The query is not one read statement. ``code`` and ``name`` are ClickHouse's error code
    and its name (``READONLY`` for a refused statement, ``SYNTAX_ERROR`` for malformed text);
    ``status`` the HTTP status of the refusal."""

    def __init__(self, reason: str, *, code: int = READONLY, status: int = 403) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.status = status

    @property
    def name(self) -> str:
        """ClickHouse's name of :attr:`code`."""
        return "READONLY" if self.code == READONLY else "SYNTAX_ERROR"


@dataclass(frozen=True, slots=True)
class ReadStatement:
    """A query the endpoint may run: its first keyword and its ``FORMAT`` clause, if any."""

    keyword: str
    output_format: str | None


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "word", "literal", "punct"
    text: str
    depth: int


def _malformed(reason: str) -> Refused:
    return Refused(reason, code=SYNTAX_ERROR, status=400)


def _quoted_end(sql: str, start: int) -> int:
    """The index after the quoted string or identifier opening at ``start``."""
    quote = sql[start]
    i = start + 1
    n = len(sql)
    while i < n:
        ch = sql[i]
        if ch == "\\":
            i += 2
            continue
        if ch == quote:
            if i + 1 < n and sql[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    raise _malformed(f"unterminated quoted text starting at position {start}")


def _heredoc_end(sql: str, start: int) -> int | None:
    """The index after the heredoc opening at ``start`` (``$tag$...$tag$``, as ClickHouse's
    lexer reads it), or None when ``$`` does not open one."""
    close = sql.find("$", start + 1)
    if close < 0:
        return None
    tag = sql[start : close + 1]
    end = sql.find(tag, close + 1)
    return None if end < 0 else end + len(tag)


def _is_word_start(ch: str) -> bool:
    return ch.isalpha() or ch == "_"


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_$"


def tokens(sql: str) -> list[_Token]:
    """The tokens of ``sql`` without whitespace and comments; ``;`` is a punct token."""
    out: list[_Token] = []
    i, n, depth = 0, len(sql), 0
    while i < n:
        ch = sql[i]
        if ch.isspace():
            i += 1
        elif sql.startswith("--", i) or ch == "#":
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end < 0:
                raise _malformed(f"unterminated comment starting at position {i}")
            i = end + 2
        elif ch in "'\"`":
            end = _quoted_end(sql, i)
            out.append(_Token("literal", sql[i:end], depth))
            i = end
        elif ch == "$" and (heredoc := _heredoc_end(sql, i)) is not None:
            out.append(_Token("literal", sql[i:heredoc], depth))
            i = heredoc
        elif _is_word_start(ch) or ch.isdigit():
            j = i + 1
            while j < n and (_is_word_char(sql[j]) or (ch.isdigit() and sql[j] == ".")):
                j += 1
            out.append(_Token("word", sql[i:j], depth))
            i = j
        else:
            if ch == "(":
                depth += 1
            out.append(_Token("punct", ch, depth))
            if ch == ")":
                depth = max(0, depth - 1)
            i += 1
    return out


def _output_format(toks: list[_Token]) -> str | None:
    """The name in the statement's own ``FORMAT <name>`` clause (outside parentheses, followed
    by nothing or by ``SETTINGS``), else None."""
    for k in range(len(toks) - 2, -1, -1):
        tok, name = toks[k], toks[k + 1]
        if tok.kind != "word" or tok.depth or tok.text.upper() != "FORMAT":
            continue
        if name.kind != "word":
            continue
        rest = toks[k + 2 :]
        if not rest or (rest[0].kind == "word" and rest[0].text.upper() == "SETTINGS"):
            return name.text
    return None


def check_read(sql: str) -> ReadStatement:
    """``sql`` as a :class:`ReadStatement`, or :class:`Refused` with the reason."""
    toks = tokens(sql)
    if toks and toks[-1].text == ";" and toks[-1].kind == "punct":
        toks = toks[:-1]
    if not toks:
        raise _malformed("empty query")
    if any(t.kind == "punct" and t.text == ";" for t in toks):
        raise Refused("one statement per request: multi-statements are not allowed")
    first = next((t for t in toks if not (t.kind == "punct" and t.text == "(")), None)
    keyword = first.text.upper() if first is not None and first.kind == "word" else ""
    if keyword not in READ_KEYWORDS:
        shown = keyword or (first.text[:20] if first is not None else "")
        raise Refused(
            f"read-only endpoint: only SELECT, WITH, SHOW, DESCRIBE, EXISTS and EXPLAIN "
            f"queries are allowed, not {shown}"
        )
    for a, b in itertools.pairwise(toks):
        if a.kind == b.kind == "word" and a.text.upper() == "INTO" and b.text.upper() == "OUTFILE":
            raise Refused("read-only endpoint: INTO OUTFILE is not allowed")
    return ReadStatement(keyword=keyword, output_format=_output_format(toks))
