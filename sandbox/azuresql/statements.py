"""Batches into statements, and a token cursor for the statements sqlglot does not model.

``split_batch`` uses sqlglot's T-SQL tokenizer (so strings, brackets and comments are respected)
and splits at top-level semicolons, ``GO`` lines and statement keywords that open a line.
``TokenCursor`` is the small recursive-descent helper the security statements are parsed with.
``declared_names``/``bind`` match RPC parameter values to the ``@P1``-style names of a statement.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlglot.dialects.tsql import TSQL
from sqlglot.errors import TokenError
from sqlglot.tokens import Token, TokenType  # type: ignore[attr-defined]

from sandbox.azuresql.results import SqlError, syntax_error

_DIALECT = TSQL()


@dataclass
class Statement:
    text: str
    tokens: list[Token]

    def words(self, n: int) -> list[str]:
        return [t.text.upper() for t in self.tokens[:n]]

    def for_sqlglot(self) -> str:
        """The text with the login-name functions renamed: sqlglot reads SUSER_SNAME(),
        SUSER_NAME() and SYSTEM_USER as CURRENT_USER, which in T-SQL is the *database* user."""
        base = self.tokens[0].start if self.tokens else 0
        text = self.text
        for token in reversed(self.tokens):
            word = token.text.upper() if token.token_type != TokenType.IDENTIFIER else ""
            if word in ("SUSER_SNAME", "SUSER_NAME", "SYSTEM_USER"):
                call = "__LOGIN_NAME" if word != "SYSTEM_USER" else "__LOGIN_NAME()"
                start, end = token.start - base, token.end - base + 1
                text = text[:start] + call + text[end:]
        return text


# Keywords that begin a statement when they open a line outside parentheses: T-SQL needs no
# semicolons between statements. Continuation lines stay put (see _continues).
_STARTERS = frozenset(
    {
        "CREATE",
        "ALTER",
        "DROP",
        "INSERT",
        "UPDATE",
        "DELETE",
        "SELECT",
        "GRANT",
        "REVOKE",
        "DENY",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "WAITFOR",
        "USE",
        "SET",
        "DECLARE",
        "EXEC",
        "EXECUTE",
    }
)
_JOINERS = frozenset({"UNION", "ALL", "EXCEPT", "INTERSECT", "AS", "ON", "FOR", "WITH", ",", "("})
_OBJECTS = frozenset({"USER", "ROLE", "TABLE", "VIEW", "INDEX", "SCHEMA", "PROCEDURE", "FUNCTION"})


def _continues(first: str, previous: str, word: str, following: str) -> bool:
    """Whether a line starting with ``word`` continues the statement that began with ``first``."""
    return (
        previous in _JOINERS
        or (first in ("INSERT", "WITH") and word == "SELECT")  # INSERT ... SELECT, CTEs
        or (first == "UPDATE" and word == "SET")
        # ALTER ROLE r / DROP MEMBER m, ALTER TABLE t / DROP COLUMN c, but not DROP USER u
        or (first == "ALTER" and word in ("DROP", "ADD", "ALTER") and following not in _OBJECTS)
    )


def split_batch(sql: str) -> list[Statement]:
    """Statements of a batch: split at top-level semicolons, ``GO`` lines and statement keywords
    that open a line (``CREATE USER ...`` then ``ALTER ROLE ...`` on the next line)."""
    try:
        # A tokenizer per batch: one keeps its position while it works, and sessions run their
        # batches in threads at the same time (a shared one mixed two batches' text).
        tokens = _DIALECT.tokenizer_class().tokenize(sql)
    except TokenError as exc:
        raise SqlError(
            105, f"Unclosed quotation mark after the character string '{sql[-20:]}'.", severity=15
        ) from exc
    statements: list[Statement] = []
    current: list[Token] = []

    def flush() -> None:
        if current:
            statements.append(Statement(sql[current[0].start : current[-1].end + 1], current[:]))
            current.clear()

    depth = 0
    for index, token in enumerate(tokens):
        if token.token_type == TokenType.SEMICOLON and depth == 0:
            flush()
            continue
        word = token.text.upper() if token.token_type != TokenType.IDENTIFIER else ""
        opens_line = not current or token.line > current[-1].line
        if depth == 0 and opens_line and current:
            following = tokens[index + 1] if index + 1 < len(tokens) else None
            if word == "GO" and (following is None or following.line > token.line):
                flush()
                continue
            first, previous = current[0].text.upper(), current[-1].text.upper()
            after = following.text.upper() if following else ""
            if word in _STARTERS and not _continues(first, previous, word, after):
                flush()
        depth += {TokenType.L_PAREN: 1, TokenType.R_PAREN: -1}.get(token.token_type, 0)
        current.append(token)
    flush()
    return statements


class TokenCursor:
    """A cursor over a statement's tokens for the hand-parsed security statements."""

    def __init__(self, tokens: list[Token]) -> None:
        self._tokens = tokens
        self._pos = 0

    def _peek(self) -> Token | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def error(self) -> SqlError:
        token = self._peek() or (self._tokens[-1] if self._tokens else None)
        return syntax_error(token.text if token else "")

    def accept(self, *words: str) -> bool:
        ahead = self._tokens[self._pos : self._pos + len(words)]
        if len(ahead) == len(words) and all(
            t.text.upper() == w and t.token_type != TokenType.IDENTIFIER
            for t, w in zip(ahead, words, strict=True)
        ):
            self._pos += len(words)
            return True
        return False

    def expect(self, *words: str) -> None:
        if not self.accept(*words):
            raise self.error()

    def name(self) -> str:
        token = self._peek()
        if token is None or token.token_type not in (TokenType.VAR, TokenType.IDENTIFIER):
            raise self.error()
        self._pos += 1
        return token.text

    def value(self, *types: TokenType) -> str:
        token = self._peek()
        if token is None or token.token_type not in types:
            raise self.error()
        self._pos += 1
        return token.text

    def end(self) -> None:
        if self._peek() is not None:
            raise self.error()


def declared_names(declaration: str) -> list[str]:
    """Parameter names of an RPC declaration such as ``@P1 nvarchar(max),@P2 int``."""
    return re.findall(r"@(\w+)", declaration or "")


def bind(names: Sequence[str], values: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Parameter values by name: named RPC parameters keep their name, others go by position."""
    out: dict[str, Any] = {}
    for index, (name, value) in enumerate(values):
        key = (
            name.lstrip("@") if name else (names[index] if index < len(names) else f"P{index + 1}")
        )
        out[key] = value
    return out
