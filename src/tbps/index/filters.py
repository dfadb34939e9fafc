"""Filter expressions for ``GalleryIndex.search(where=...)``, compiled to parameterised SQL.

The user's text is never pasted into SQL: it is tokenised and parsed by a small
recursive-descent parser into a tree, column names are checked against the index's known
columns (and then double-quoted), and every literal becomes a ``?`` parameter. Anything
outside the grammar (``;``, comments, sub-queries, function calls) is a ``FilterError``.

Grammar (keywords are case-insensitive)::

    expr    := and_expr (OR and_expr)*
    and_expr:= not_expr (AND not_expr)*
    not_expr:= NOT not_expr | '(' expr ')' | predicate
    predicate := column op value
               | column [NOT] IN '(' value (',' value)* ')'
               | column [NOT] LIKE string
               | column [NOT] BETWEEN value AND value
               | column IS [NOT] NULL
    op      := = | == | != | <> | < | <= | > | >=
    value   := 'single-quoted string' ('' escapes a quote) | number

Examples: ``camera = 'c3' AND time >= '2024-01-01'``, ``person_id IN (3, 7)``,
``NOT (camera = 'c1' OR camera LIKE 'c2%')``.

A filter can also be a ``{column: value}`` dict whose pairs must all match (the REST API's
``filters`` object): ``compile_filter_dict`` binds its values as parameters directly, with no
expression text in between; ``compile_where`` takes either form.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Sequence

from tbps.index.errors import FilterError

_KEYWORDS = {"AND", "OR", "NOT", "IN", "LIKE", "IS", "NULL", "BETWEEN"}
_OPS = {"=": "=", "==": "=", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_MAX_DEPTH = 64
_MAX_LENGTH = 10_000
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|<>|!=|==|=|<|>)
  | (?P<punct>[(),])
    """,
    re.VERBOSE,
)


@dataclass
class _Tok:
    kind: str  # "string" | "number" | "ident" | "kw" | "op" | "punct" | "end"
    value: object
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            bad = text[pos]
            if bad == "'":
                raise FilterError(f"unterminated string starting at position {pos} in filter {text!r}")
            raise FilterError(
                f"unexpected character {bad!r} at position {pos} in filter {text!r} "
                "(allowed: column names, 'strings', numbers, = != < <= > >=, AND OR NOT IN LIKE "
                "BETWEEN IS NULL, parentheses)"
            )
        kind = m.lastgroup
        raw = m.group()
        if kind == "string":
            toks.append(_Tok("string", raw[1:-1].replace("''", "'"), pos))
        elif kind == "number":
            toks.append(_Tok("number", _number(raw, pos, text), pos))
        elif kind == "ident":
            if raw.upper() in _KEYWORDS:
                toks.append(_Tok("kw", raw.upper(), pos))
            else:
                toks.append(_Tok("ident", raw, pos))
        elif kind in ("op", "punct"):
            toks.append(_Tok(kind, raw, pos))
        pos = m.end()
    toks.append(_Tok("end", None, len(text)))
    return toks


def _number(raw: str, pos: int, text: str) -> int | float:
    """A number literal; an integer outside SQLite's 64 bits is a ``FilterError`` (int() of a
    5000-digit string would raise ValueError, and binding a 20-digit one OverflowError)."""
    if any(c in raw for c in ".eE"):
        return float(raw)
    if len(raw.lstrip("+-").lstrip("0")) <= 19 and _INT64_MIN <= int(raw) <= _INT64_MAX:
        return int(raw)
    shown = raw if len(raw) <= 24 else raw[:20] + "..."
    raise FilterError(f"integer {shown} at position {pos} is out of range (-2**63 to 2**63-1) in filter "
                      f"{text if len(text) <= 200 else text[:200] + '...'!r}")


class _Parser:
    def __init__(self, text: str, columns: Sequence[str]):
        self.text = text
        self.columns = list(columns)
        self.lower = {c.lower(): c for c in columns}
        self.toks = _tokenize(text)
        self.i = 0
        self.params: list[object] = []
        self.depth = 0

    # -- token helpers ------------------------------------------------------------------
    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def accept_kw(self, kw: str) -> bool:
        tok = self.peek()
        if tok.kind == "kw" and tok.value == kw:
            self.i += 1
            return True
        return False

    def fail(self, what: str, tok: _Tok | None = None) -> FilterError:
        tok = tok or self.peek()
        found = "end of filter" if tok.kind == "end" else repr(self.text[tok.pos :].split()[0])
        return FilterError(f"expected {what} at position {tok.pos}, found {found}, in filter {self.text!r}")

    def expect_punct(self, p: str) -> None:
        tok = self.peek()
        if tok.kind != "punct" or tok.value != p:
            raise self.fail(f"{p!r}")
        self.i += 1

    # -- grammar ------------------------------------------------------------------------
    def parse(self) -> str:
        sql = self.expr()
        if self.peek().kind != "end":
            raise self.fail("AND, OR or end of filter")
        return sql

    def expr(self) -> str:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise FilterError(f"filter nests deeper than {_MAX_DEPTH} levels: {self.text[:80]!r}...")
        parts = [self.and_expr()]
        while self.accept_kw("OR"):
            parts.append(self.and_expr())
        self.depth -= 1
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def and_expr(self) -> str:
        parts = [self.not_expr()]
        while self.accept_kw("AND"):
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def not_expr(self) -> str:
        if self.accept_kw("NOT"):
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise FilterError(f"filter nests deeper than {_MAX_DEPTH} levels: {self.text[:80]!r}...")
            inner = self.not_expr()
            self.depth -= 1
            return f"(NOT {inner})"
        tok = self.peek()
        if tok.kind == "punct" and tok.value == "(":
            self.i += 1
            inner = self.expr()
            self.expect_punct(")")
            return inner
        return self.predicate()

    def column(self) -> str:
        tok = self.take()
        if tok.kind != "ident":
            self.i -= 1
            raise self.fail("a column name")
        name = self.lower.get(str(tok.value).lower())
        if name is None:
            raise FilterError(
                f"unknown column {tok.value!r} in filter {self.text!r}; known columns: "
                + ", ".join(self.columns)
            )
        return '"' + name.replace('"', '""') + '"'

    def value(self) -> str:
        tok = self.take()
        if tok.kind not in ("string", "number"):
            self.i -= 1
            raise self.fail("a value ('quoted string' or number)")
        self.params.append(tok.value)
        return "?"

    def predicate(self) -> str:
        col = self.column()
        tok = self.peek()
        if tok.kind == "op":
            self.i += 1
            return f"{col} {_OPS[str(tok.value)]} {self.value()}"
        if self.accept_kw("IS"):
            neg = self.accept_kw("NOT")
            if not self.accept_kw("NULL"):
                raise self.fail("NULL")
            return f"{col} IS {'NOT ' if neg else ''}NULL"
        neg = "NOT " if self.accept_kw("NOT") else ""
        if self.accept_kw("IN"):
            self.expect_punct("(")
            vals = [self.value()]
            while self.peek().kind == "punct" and self.peek().value == ",":
                self.i += 1
                vals.append(self.value())
            self.expect_punct(")")
            return f"{col} {neg}IN ({', '.join(vals)})"
        if self.accept_kw("LIKE"):
            if self.peek().kind != "string":
                raise self.fail("a 'quoted pattern' after LIKE")
            return f"{col} {neg}LIKE {self.value()}"
        if self.accept_kw("BETWEEN"):
            lo = self.value()
            if not self.accept_kw("AND"):
                raise self.fail("AND in BETWEEN")
            return f"{col} {neg}BETWEEN {lo} AND {self.value()}"
        raise self.fail("an operator (= != < <= > >= IN LIKE BETWEEN IS)")


def compile_filter(text: str, columns: Sequence[str]) -> tuple[str, list[object]]:
    """Parse a filter expression into ``(sql_condition, params)`` for ``WHERE`` in SQLite.

    ``columns`` are the names the filter may use (matched case-insensitively). Raises
    ``FilterError`` with the position and the known columns when the text is not valid.
    """
    if not isinstance(text, str) or not text.strip():
        raise FilterError("empty filter expression")
    if len(text) > _MAX_LENGTH:
        raise FilterError(f"filter expression longer than {_MAX_LENGTH} characters")
    parser = _Parser(text, columns)
    sql = parser.parse()
    return sql, parser.params


def compile_filter_dict(filters: Mapping[str, object], columns: Sequence[str]) -> tuple[str, list[object]]:
    """``{column: value}`` pairs that must all match -> ``(sql_condition, params)``.

    Columns are matched case-insensitively against ``columns``, as in ``compile_filter``,
    and double-quoted; every value becomes a ``?`` parameter: a string as it is, an integer
    or a finite float as a number, a boolean as the string ``'true'`` or ``'false'``. An
    empty dict matches every item. Raises ``FilterError`` naming an unknown column or a
    value of another type.
    """
    lower = {c.lower(): c for c in columns}
    parts, params = [], []
    for column, value in filters.items():
        name = lower.get(column.lower()) if isinstance(column, str) else None
        if name is None:
            known = ", ".join(columns) or "(none)"
            raise FilterError(f"unknown filter column {column!r}; known columns: {known}")
        parts.append('"' + name.replace('"', '""') + '" = ?')
        params.append(_filter_value(column, value))
    if not parts:
        return "1", []
    return (parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"), params


def _filter_value(column: str, value: object) -> object:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        if not _INT64_MIN <= int(value) <= _INT64_MAX:
            raise FilterError(f"filter value for {column!r} is out of range (-2**63 to 2**63-1)")
        return int(value)
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise FilterError(f"filter value for {column!r} must be a finite number")
        return float(value)
    if isinstance(value, str):
        return value
    raise FilterError(f"filter value for {column!r} must be a string, a number or a boolean, "
                      f"not {type(value).__name__}")


def filter_text(filters: Mapping[str, object]) -> str | None:
    """A ``{column: value}`` filter written as the expression ``compile_filter`` reads the same
    way (``camera = 'o''neil' AND n = 3``), for showing it; ``None`` for an empty dict.

    Strings are single-quoted with embedded quotes doubled, numbers written as numbers,
    booleans as ``'true'`` / ``'false'``. Only for display: searches compile the dict itself.
    """
    parts = []
    for column, value in filters.items():
        if isinstance(value, bool):
            literal = "'true'" if value else "'false'"
        elif isinstance(value, numbers.Integral):
            literal = str(int(value))
        elif isinstance(value, numbers.Real):
            literal = repr(float(value))
        else:
            literal = "'" + str(value).replace("'", "''") + "'"
        parts.append(f"{column} = {literal}")
    return " AND ".join(parts) or None


def compile_where(where: str | Mapping[str, object], columns: Sequence[str]) -> tuple[str, list[object]]:
    """A filter in either form, an expression string or a ``{column: value}`` dict, ->
    ``(sql_condition, params)`` (``compile_filter`` or ``compile_filter_dict``)."""
    if isinstance(where, Mapping):
        return compile_filter_dict(where, columns)
    return compile_filter(where, columns)
