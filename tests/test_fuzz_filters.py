"""Property-based fuzzing of what users type into an index: ``--where`` expressions, the REST API's
``{column: value}`` filters, and the metadata CSV.

- Arbitrary text as a filter raises only ``FilterError`` (a one-line user error), and whatever
  compiles is SQL made of quoted known columns, ``?`` and the grammar's keywords only: no
  literal reaches the SQL text, so nothing can be injected.
- Expressions drawn from the grammar select exactly the rows a Python evaluation of the same
  predicate (SQL's three-valued logic, LIKE's wildcards) selects on a small index.
- Filter dicts of any keys and values raise only user errors and match a Python evaluation.
- Any CSV text makes ``read_metadata_csv`` raise only ``IndexInputError``, and what it returns
  stores in SQLite (no 64-bit overflow) and round-trips the cells.
"""

from __future__ import annotations

import csv
import io
import re
import sqlite3

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tbps.index import build_index_from_features  # noqa: E402
from tbps.index.errors import FilterError, GalleryIndexError, IndexInputError  # noqa: E402
from tbps.index.filters import compile_filter  # noqa: E402
from tbps.index.scan import read_metadata_csv  # noqa: E402
from tbps.index.store import GalleryIndex  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# The small table every predicate is evaluated on: None is SQL NULL.
ROWS = [
    {"camera": "c1", "n": 3, "x": 0.5},
    {"camera": "c2", "n": -7, "x": None},
    {"camera": None, "n": 0, "x": 2.25},
    {"camera": "C1", "n": None, "x": -1.0},
    {"camera": "a_b%", "n": 12, "x": 12.0},
    {"camera": "o'neil", "n": 3, "x": 3.0},
    {"camera": "", "n": 2**62, "x": 1e300},
]
TEXT_COLS, NUM_COLS = ["camera"], ["n", "x"]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "idx"
    feats = np.eye(len(ROWS), 4, dtype=np.float32) + 0.1
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    meta = {c: [r[c] for r in ROWS] for c in ("camera", "n", "x")}
    build_index_from_features(root, feats, [f"/g/p{i}.png" for i in range(len(ROWS))],
                              fingerprint={"arch": "fuzz"}, metadata=meta)
    with GalleryIndex.open(root) as ix:
        assert [ix.get(i).metadata["n"] for i in range(len(ROWS))] == meta["n"]
        yield ix


# ---- a Python evaluation of the grammar -------------------------------------------------
# A predicate is a tuple: ("cmp", col, op, v) | ("in", col, neg, vs) | ("like", col, neg, pat) |
# ("between", col, neg, lo, hi) | ("null", col, neg) | ("not", p) | ("and", p, q) | ("or", p, q).


def _sql_literal(v) -> str:
    return "'" + v.replace("'", "''") + "'" if isinstance(v, str) else repr(v)


def to_text(p) -> str:
    kind = p[0]
    if kind == "cmp":
        return f"{p[1]} {p[2]} {_sql_literal(p[3])}"
    if kind == "in":
        return f"{p[1]} {'NOT ' if p[2] else ''}IN ({', '.join(_sql_literal(v) for v in p[3])})"
    if kind == "like":
        return f"{p[1]} {'NOT ' if p[2] else ''}LIKE {_sql_literal(p[3])}"
    if kind == "between":
        return f"{p[1]} {'NOT ' if p[2] else ''}BETWEEN {_sql_literal(p[3])} AND {_sql_literal(p[4])}"
    if kind == "null":
        return f"{p[1]} IS {'NOT ' if p[2] else ''}NULL"
    if kind == "not":
        return f"NOT ({to_text(p[1])})"
    return f"({to_text(p[1])}) {kind.upper()} ({to_text(p[2])})"


def _like(value: str, pattern: str) -> bool:
    rx = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, re.S | re.I) is not None  # ASCII-only strings: SQLite folds ASCII case


def _neg(b, neg: bool):
    return None if b is None else (not b if neg else b)


def evaluate(p, row):
    """True / False / None (unknown) as SQLite decides ``p`` on ``row``."""
    kind = p[0]
    if kind in ("and", "or"):
        a, b = evaluate(p[1], row), evaluate(p[2], row)
        if kind == "and":
            return False if a is False or b is False else None if a is None or b is None else True
        return True if a is True or b is True else None if a is None or b is None else False
    if kind == "not":
        return _neg(evaluate(p[1], row), True)
    v = row[p[1]]
    if kind == "null":
        return (v is None) != p[2]
    if v is None:
        return None
    if kind == "cmp":
        return {"=": v == p[3], "==": v == p[3], "!=": v != p[3], "<>": v != p[3], "<": v < p[3],
                "<=": v <= p[3], ">": v > p[3], ">=": v >= p[3]}[p[2]]
    if kind == "in":
        return _neg(v in p[3], p[2])
    if kind == "like":
        return _neg(_like(v, p[3]), p[2])
    return _neg(p[3] <= v <= p[4], p[2])  # between


# values drawn half the time from the table itself, so that = <= BETWEEN IN meet their edge cases
_pattern = st.one_of(st.sampled_from(["c1", "C%", "%1", "_1", "a_b%", "%'%", "_", "%", ""]),
                     st.text(alphabet="abcC12_%' ", max_size=5))
_ascii = st.one_of(st.sampled_from(sorted({r["camera"] for r in ROWS if r["camera"] is not None})), _pattern)
_numbers = st.one_of(st.sampled_from(sorted({r[c] for r in ROWS for c in NUM_COLS if r[c] is not None})),
                     st.integers(-20, 20), st.sampled_from([-(2**63), 2**63 - 1]),
                     st.floats(-50, 50, allow_nan=False).map(lambda f: round(f, 2)))
_ops = st.sampled_from(["=", "==", "!=", "<>", "<", "<=", ">", ">="])


def _leaf(col: str, values):
    return st.one_of(
        st.tuples(st.just("cmp"), st.just(col), _ops, values),
        st.tuples(st.just("in"), st.just(col), st.booleans(), st.lists(values, min_size=1, max_size=4)),
        st.tuples(st.just("between"), st.just(col), st.booleans(), values, values),
        st.tuples(st.just("null"), st.just(col), st.booleans()),
        *([st.tuples(st.just("like"), st.just(col), st.booleans(), _pattern)] if values is _ascii else []),
    )


_leaves = st.one_of(*[_leaf(c, _ascii) for c in TEXT_COLS], *[_leaf(c, _numbers) for c in NUM_COLS])
predicates = st.recursive(_leaves, lambda inner: st.one_of(
    st.tuples(st.just("not"), inner), st.tuples(st.sampled_from(["and", "or"]), inner, inner)), max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(predicates)
@example(("like", "camera", False, "c%"))  # SQLite's LIKE folds ASCII case
@example(("cmp", "n", "<=", 3))
@example(("between", "x", True, 0.5, 3.0))
def test_grammar_filters_select_what_python_selects(index, p):
    want = [i for i, row in enumerate(ROWS) if evaluate(p, row) is True]
    assert index.filter_ids(to_text(p)).tolist() == want, to_text(p)


_SAFE_SQL = re.compile(r'(?:\s+|[(),?]|"(?:id|path|relpath|size|mtime|sha256|width|height|camera|n|x)"|'
                       r"!=|<=|>=|[=<>]|AND|OR|NOT|IN|LIKE|BETWEEN|IS|NULL)*")
_SQLISH = st.sampled_from(["'", "''", ";", "--", "/*", "*/", ")", "(", " OR ", " AND ", "1=1", "camera", "n",
                           "DROP TABLE items", "SELECT", "UNION", "\"", "x'", "\\", "%", "\x00", "é", "9" * 30,
                           "1e999", "-", ".", ",", " IN ", " LIKE ", " IS NULL", " NOT ", "= ", "<>"])


@FUZZ
@given(st.one_of(st.text(max_size=80), st.lists(_SQLISH, max_size=12).map("".join)))
def test_any_text_is_a_filter_error_or_safe_sql(index, text):
    columns = index.columns
    try:
        sql, params = compile_filter(text, columns)
    except FilterError:
        pass
    else:
        assert _SAFE_SQL.fullmatch(sql), sql  # no user text in the SQL: literals are all parameters
        assert sql.count("?") == len(params)
    try:
        index.filter_ids(text)
    except GalleryIndexError as e:
        assert e.user_error
    assert len(index) == len(ROWS) and index.filter_ids("id >= 0").tolist() == list(range(len(ROWS)))


_values = st.one_of(st.integers(), st.floats(), st.text(max_size=6), st.booleans(), st.none(),
                    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(["camera", "n", "x", "CAMERA", "id"]), st.text(max_size=6)),
                       _values, max_size=3))
@example(filters={"WIDTH": 0})  # built-in columns, matched case-insensitively (found by the fuzzer)
@example(filters={"width": 0, "camera": "c1"})
def test_filter_dicts_raise_only_user_errors_and_match_python(index, filters):
    try:
        got = index.filter_ids(filters).tolist()
    except GalleryIndexError as e:
        assert e.user_error
        return
    # the CSV columns as written, the built-in ones (path, width, size, ...) as the index recorded them
    rows = [{"path": index.get(i).path, **index.get(i).metadata, **r, "id": i} for i, r in enumerate(ROWS)]

    def value(v):
        return ("true" if v else "false") if isinstance(v, bool) else v

    want = [r["id"] for r in rows if all(r[k.lower()] is not None and r[k.lower()] == value(v)
                                         for k, v in filters.items())]
    assert got == want, filters


# ---- the metadata CSV -------------------------------------------------------------------
_cells = st.one_of(st.text(max_size=8), st.integers().map(str), st.floats().map(repr),
                   st.sampled_from(["99999999999999999999999", "-9223372036854775809", "9" * 5000, "1e999",
                                    "nan", "0x10", " 7 ", "", "NULL", "\ufeff"]))


@FUZZ
@given(st.one_of(st.text(max_size=200),
                 st.lists(st.lists(_cells, min_size=1, max_size=4), min_size=1, max_size=6)))
def test_any_csv_is_an_input_error_or_stores(tmp_path_factory, content):
    tmp = tmp_path_factory.mktemp("csv")
    if isinstance(content, list):  # well-formed CSV rows, a path column first
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file"] + [f"col{j}" for j in range(len(content[0]))])
        for i, row in enumerate(content):
            w.writerow([f"p{i}.png"] + (row + [""] * len(content[0]))[: len(content[0])])
        text = buf.getvalue()
    else:
        text = content
    (tmp / "m.csv").write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        meta = read_metadata_csv(tmp / "m.csv", tmp)
    except IndexInputError:
        return
    db = sqlite3.connect(":memory:")
    cols = ", ".join(f'"{c}" {meta.types[c]}' for c in meta.columns)
    db.execute(f"CREATE TABLE t (path TEXT{', ' + cols if cols else ''})")
    for rel, values in meta.rows.items():  # must bind: no OverflowError, no NaN in a REAL column
        db.execute(f"INSERT INTO t VALUES ({', '.join('?' * (1 + len(meta.columns)))})",
                   [rel] + [values[c] for c in meta.columns])
        for c in meta.columns:
            v = values[c]
            if meta.types[c] == "INTEGER":
                assert v is None or (isinstance(v, int) and -(2**63) <= v < 2**63)
            elif meta.types[c] == "REAL":
                assert v is None or np.isfinite(v)
    if isinstance(content, list):
        for i, row in enumerate(content):
            cells = (row + [""] * len(content[0]))[: len(content[0])]
            got = meta.rows[f"p{i}.png"]
            for j, cell in enumerate(cells):
                v = got[f"col{j}"]
                assert (v is None) == (cell.strip() == "")
                if v is not None and meta.types[f"col{j}"] != "REAL":
                    assert str(v) == cell.strip() if meta.types[f"col{j}"] == "TEXT" else v == int(cell)
