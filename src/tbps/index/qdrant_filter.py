"""A parsed ``where`` filter (``tbps.index.filter_tree``) as Qdrant's own filter models.

No text is ever built: every node becomes ``models.Filter`` / ``FieldCondition`` /
``MatchValue`` / ``MatchAny`` / ``Range`` / ``DatetimeRange`` / ``IsEmptyCondition`` objects
holding the parsed literals. The SQLite store's semantics are kept, NULLs included: SQL's
three-valued logic (a comparison with NULL is neither true nor false, so ``NOT camera =
'c1'`` leaves out items without a camera) is reproduced by building, for every node, both the
filter of the items where it is true and the filter of those where it is false. Literals are
converted to the column's type as SQLite's column affinity does (``person_id = '17'`` matches
17; ``camera = 3`` matches the text '3').

What Qdrant cannot express is refused with one line (``FilterError``): ``LIKE`` (Qdrant has no
pattern match) and ``<`` ``<=`` ``>`` ``>=`` ``BETWEEN`` on text that is not an ISO 8601 date
or time (Qdrant orders numbers and datetimes only). Text dates compare as instants (naive
times as UTC), where SQLite compares their characters: the two agree on times written in one
ISO 8601 form, e.g. every value ``YYYY-MM-DD`` or every value ``YYYY-MM-DDTHH:MM:SS``.
"""

from __future__ import annotations

import datetime as _dt
import math
import re

from tbps.index.errors import FilterError
from tbps.index.filter_tree import And, Node, Not, Or, Pred

_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_INT = re.compile(r"^\s*[-+]?\d+\s*$")


def qdrant_filter(node: Node | None, types: dict[str, str]):
    """``models.Filter`` of the items where ``node`` is true (None: every item).

    types: column -> "INTEGER" | "REAL" | "TEXT" (the store's manifest)."""
    if node is None:
        return None
    from qdrant_client import models

    return _Translator(models, types).true(node)


class _Translator:
    def __init__(self, models, types: dict[str, str]):
        self.m = models
        self.types = types

    # -- three-valued logic -------------------------------------------------------------
    def true(self, node: Node):
        m = self.m
        if isinstance(node, And):
            return m.Filter(must=[self.true(p) for p in node.parts])
        if isinstance(node, Or):
            return m.Filter(should=[self.true(p) for p in node.parts])
        if isinstance(node, Not):
            return self.false(node.part)
        return self.pred(node, negate=False)

    def false(self, node: Node):
        m = self.m
        if isinstance(node, And):
            return m.Filter(should=[self.false(p) for p in node.parts])
        if isinstance(node, Or):
            return m.Filter(must=[self.false(p) for p in node.parts])
        if isinstance(node, Not):
            return self.true(node.part)
        return self.pred(node, negate=True)

    def pred(self, p: Pred, negate: bool):
        """Where ``p`` is true (or, ``negate``, false): a NULL column is neither."""
        m = self.m
        empty = m.IsEmptyCondition(is_empty=m.PayloadField(key=p.column))
        if p.op == "is_null":
            is_null = m.Filter(must=[empty])
            return m.Filter(must_not=[empty]) if (negate != p.negated) else is_null
        if p.op == "like":
            raise FilterError(f"the qdrant store cannot evaluate LIKE (on {p.column!r}): Qdrant has no pattern "
                              "match; use =, IN or a range")
        holds = self.condition(p)
        want_true = negate == (p.negated or p.op == "!=")  # NOT IN, NOT BETWEEN, != are the false side of =
        if want_true:
            return m.Filter(must=[holds])
        return m.Filter(must_not=[holds, empty])

    # -- one comparison, without NULLs ----------------------------------------------------
    def condition(self, p: Pred):
        """The condition of the positive form of ``p`` (=, IN, BETWEEN, a range)."""
        m = self.m
        kind = self.types.get(p.column, "TEXT")
        vals = [self.coerce(p.column, kind, v) for v in p.values]
        key = p.column
        if p.op in ("=", "!=", "in"):
            if kind == "TEXT":
                return self.field(key, m.MatchAny(any=vals) if len(vals) > 1 else m.MatchValue(value=vals[0]))
            ints = [int(v) for v in vals if float(v).is_integer()]
            if kind == "INTEGER" and len(ints) == len(vals):
                return self.field(key, m.MatchAny(any=ints) if len(ints) > 1 else m.MatchValue(value=ints[0]))
            eqs = [self.field(key, range_=m.Range(gte=float(v), lte=float(v))) for v in vals]
            return eqs[0] if len(eqs) == 1 else m.Filter(should=eqs)
        bounds = {"<": ("lt",), "<=": ("lte",), ">": ("gt",), ">=": ("gte",), "between": ("gte", "lte")}[p.op]
        if kind == "TEXT":
            times = [_as_time(v) for v in vals]
            if any(t is None for t in times):
                raise FilterError(
                    f"the qdrant store cannot compare text column {p.column!r} with {p.op.upper()} "
                    f"{', '.join(repr(v) for v in vals)}: Qdrant orders numbers and ISO 8601 dates only; use = or IN"
                )
            return self.field(key, range_=m.DatetimeRange(**dict(zip(bounds, times))))
        return self.field(key, range_=m.Range(**dict(zip(bounds, (float(v) for v in vals)))))

    def field(self, key: str, match=None, range_=None):
        if match is not None:
            return self.m.FieldCondition(key=key, match=match)
        return self.m.FieldCondition(key=key, range=range_)

    @staticmethod
    def coerce(column: str, kind: str, value):
        """A literal as SQLite's affinity for a column of ``kind`` would compare it."""
        if kind == "TEXT":
            if isinstance(value, str):
                return value
            return str(value)
        if isinstance(value, str):
            if _INT.match(value):
                return int(value)
            if _NUMBER.match(value):
                return float(value)
            raise FilterError(f"column {column!r} holds numbers; compare it with a number, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise FilterError(f"filter value for {column!r} must be a finite number")
        return value


def _as_time(value) -> _dt.datetime | None:
    """An ISO 8601 date or date-time literal as a datetime (naive: UTC); None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        t = _dt.datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=_dt.timezone.utc)
