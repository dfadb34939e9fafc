"""The ``where`` filter language of ``tbps.index.filters`` parsed into a tree, for stores that
are not SQL (``tbps.index.qdrant_store`` turns the tree into Qdrant's own filter models).

Same tokenizer, grammar, column check and error messages as ``compile_filter`` (this parser
is a subclass of its parser whose grammar rules return nodes instead of SQL text), so a filter
is valid here exactly when it is valid for the SQLite store. A ``{column: value}`` dict
becomes an AND of equalities, its values checked as ``compile_filter_dict`` checks them.

Nodes: ``And(parts)``, ``Or(parts)``, ``Not(part)`` and ``Pred(column, op, values)`` with op
one of ``= != < <= > >= in like between is_null`` and ``negated`` for ``NOT IN``, ``NOT LIKE``,
``NOT BETWEEN`` and ``IS NOT NULL``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Sequence, Union

from tbps.index.errors import FilterError
from tbps.index.filters import _MAX_DEPTH, _MAX_LENGTH, _OPS, _filter_value, _Parser


@dataclass(frozen=True)
class Pred:
    column: str  # the index's spelling of the column
    op: str  # "=", "!=", "<", "<=", ">", ">=", "in", "like", "between", "is_null"
    values: tuple = ()  # literals: one, two (between) or many (in)
    negated: bool = False  # NOT IN, NOT LIKE, NOT BETWEEN, IS NOT NULL


@dataclass(frozen=True)
class And:
    parts: tuple


@dataclass(frozen=True)
class Or:
    parts: tuple


@dataclass(frozen=True)
class Not:
    part: "Node"


Node = Union[Pred, And, Or, Not]


class _TreeParser(_Parser):
    """``compile_filter``'s parser with grammar rules that build nodes."""

    def parse(self) -> Node:
        node = self.expr()
        if self.peek().kind != "end":
            raise self.fail("AND, OR or end of filter")
        return node

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise FilterError(f"filter nests deeper than {_MAX_DEPTH} levels: {self.text[:80]!r}...")
        parts = [self.and_expr()]
        while self.accept_kw("OR"):
            parts.append(self.and_expr())
        self.depth -= 1
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def and_expr(self) -> Node:
        parts = [self.not_expr()]
        while self.accept_kw("AND"):
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def not_expr(self) -> Node:
        if self.accept_kw("NOT"):
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise FilterError(f"filter nests deeper than {_MAX_DEPTH} levels: {self.text[:80]!r}...")
            inner = self.not_expr()
            self.depth -= 1
            return Not(inner)
        tok = self.peek()
        if tok.kind == "punct" and tok.value == "(":
            self.i += 1
            inner = self.expr()
            self.expect_punct(")")
            return inner
        return self.predicate()

    def name(self) -> str:
        quoted = self.column()  # checks the name against the index's columns
        return quoted[1:-1].replace('""', '"')

    def literal(self):
        tok = self.take()
        if tok.kind not in ("string", "number"):
            self.i -= 1
            raise self.fail("a value ('quoted string' or number)")
        return tok.value

    def predicate(self) -> Node:
        col = self.name()
        tok = self.peek()
        if tok.kind == "op":
            self.i += 1
            return Pred(col, _OPS[str(tok.value)], (self.literal(),))
        if self.accept_kw("IS"):
            neg = self.accept_kw("NOT")
            if not self.accept_kw("NULL"):
                raise self.fail("NULL")
            return Pred(col, "is_null", (), neg)
        neg = self.accept_kw("NOT")
        if self.accept_kw("IN"):
            self.expect_punct("(")
            vals = [self.literal()]
            while self.peek().kind == "punct" and self.peek().value == ",":
                self.i += 1
                vals.append(self.literal())
            self.expect_punct(")")
            return Pred(col, "in", tuple(vals), neg)
        if self.accept_kw("LIKE"):
            if self.peek().kind != "string":
                raise self.fail("a 'quoted pattern' after LIKE")
            return Pred(col, "like", (self.literal(),), neg)
        if self.accept_kw("BETWEEN"):
            lo = self.literal()
            if not self.accept_kw("AND"):
                raise self.fail("AND in BETWEEN")
            return Pred(col, "between", (lo, self.literal()), neg)
        raise self.fail("an operator (= != < <= > >= IN LIKE BETWEEN IS)")


def parse_filter(where: str | Mapping[str, object], columns: Sequence[str]) -> Node | None:
    """A filter expression or ``{column: value}`` dict -> its tree (None: an empty dict, all items).

    Raises ``FilterError`` exactly where ``compile_where`` does."""
    if isinstance(where, Mapping):
        lower = {c.lower(): c for c in columns}
        parts = []
        for column, value in where.items():
            name = lower.get(column.lower()) if isinstance(column, str) else None
            if name is None:
                known = ", ".join(columns) or "(none)"
                raise FilterError(f"unknown filter column {column!r}; known columns: {known}")
            parts.append(Pred(name, "=", (_filter_value(column, value),)))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else And(tuple(parts))
    if not isinstance(where, str) or not where.strip():
        raise FilterError("empty filter expression")
    if len(where) > _MAX_LENGTH:
        raise FilterError(f"filter expression longer than {_MAX_LENGTH} characters")
    return _TreeParser(where, columns).parse()
