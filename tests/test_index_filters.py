"""Filter expressions: compiled SQL agrees with Python predicates; injections are refused."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from tbps.index import FilterError, compile_filter
from tbps.index.filters import compile_filter_dict, compile_where, filter_text

COLUMNS = ["id", "camera", "person_id", "time", "score"]
ROWS = [
    (i, f"c{i % 4}" if i % 7 else None, i % 5, f"2024-01-{i % 28 + 1:02d}", i / 10)
    for i in range(60)
]


@pytest.fixture(scope="module")
def db():
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, camera TEXT, person_id INTEGER, time TEXT, score REAL)")
    con.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?)", ROWS)
    con.execute("CREATE TABLE x (y)")
    return con


def select(db, where):
    sql, params = compile_filter(where, COLUMNS)
    return [r[0] for r in db.execute(f"SELECT id FROM items WHERE {sql} ORDER BY id", params)]


CASES = [
    ("camera = 'c3'", lambda r: r[1] == "c3"),
    ("camera == 'c3' and person_id > 2", lambda r: r[1] == "c3" and r[2] > 2),
    ("camera = 'c1' OR camera = 'c2' AND person_id = 0", lambda r: r[1] == "c1" or (r[1] == "c2" and r[2] == 0)),
    ("(camera = 'c1' OR camera = 'c2') AND person_id = 0", lambda r: r[1] in ("c1", "c2") and r[2] == 0),
    ("NOT camera = 'c1'", lambda r: r[1] is not None and r[1] != "c1"),
    ("camera != 'c1'", lambda r: r[1] is not None and r[1] != "c1"),
    ("camera <> 'c1'", lambda r: r[1] is not None and r[1] != "c1"),
    ("camera IS NULL", lambda r: r[1] is None),
    ("camera IS NOT NULL AND person_id <= 1", lambda r: r[1] is not None and r[2] <= 1),
    ("person_id IN (1, 3)", lambda r: r[2] in (1, 3)),
    ("person_id NOT IN (1, 3)", lambda r: r[2] not in (1, 3)),
    ("time >= '2024-01-10' AND time < '2024-01-20'", lambda r: "2024-01-10" <= r[3] < "2024-01-20"),
    ("time BETWEEN '2024-01-05' AND '2024-01-07'", lambda r: "2024-01-05" <= r[3] <= "2024-01-07"),
    ("score > 2.5e0", lambda r: r[4] > 2.5),
    ("score >= -1 AND id < 10", lambda r: r[0] < 10),
    ("camera LIKE 'C_'", lambda r: r[1] is not None),  # LIKE is case-insensitive in SQLite
    ("CAMERA like 'c1%' and NOT (person_id = 1)", lambda r: r[1] == "c1" and r[2] != 1),
    ("person_id = '2'", lambda r: r[2] == 2),  # INTEGER affinity converts the quoted number
]


@pytest.mark.parametrize("where,pred", CASES, ids=[c[0] for c in CASES])
def test_compiled_filter_matches_python(db, where, pred):
    assert select(db, where) == [r[0] for r in ROWS if pred(r)]


def test_literals_become_parameters_never_sql():
    sql, params = compile_filter("camera = 'it''s; DROP TABLE x --' AND person_id IN (1, 2)", COLUMNS)
    assert sql == '("camera" = ? AND "person_id" IN (?, ?))'
    assert params == ["it's; DROP TABLE x --", 1, 2]


@pytest.mark.parametrize(
    "where,match",
    [
        ("camera = 'c3'; DROP TABLE x", "unexpected character ';'"),
        ("camera = 'c3' -- comment", "unexpected character '-'"),
        ("camera = 'c3' /* x */", "unexpected character '/'"),
        ("camera = (SELECT y FROM x)", "expected a value"),
        ("camera = lower('C3')", "expected a value"),
        ("cam = 'c3'", "unknown column 'cam'.*known columns: id, camera, person_id, time, score"),
        ("camera = \"c3\"", "unexpected character '\"'"),
        ("camera = 'c3", "unterminated string"),
        ("camera 'c3'", "expected an operator"),
        ("camera = 'c3' AND", "expected a column name"),
        ("(camera = 'c3'", r"expected '\)'"),
        ("person_id IN ()", "expected a value"),
        ("camera LIKE 3", "quoted pattern"),
        ("camera IS 'c3'", "expected NULL"),
        ("1 = 1", "expected a column name"),
        ("camera = 'c1' OR 1", "expected a column name"),
        ("   ", "empty filter"),
        ("(" * 100 + "camera = 'c1'" + ")" * 100, "nests deeper"),
    ],
)
def test_bad_filters_raise_filter_error(db, where, match):
    with pytest.raises(FilterError, match=match):
        select(db, where)
    # ...and the table the injection aimed at is still there.
    assert db.execute("SELECT COUNT(*) FROM x").fetchone() == (0,)


def test_filter_error_is_a_user_error():
    assert FilterError.user_error is True


# ---- the {column: value} form (the REST API's `filters` object) ----------------------------

DICT_CASES = [
    ({"camera": "c3"}, lambda r: r[1] == "c3"),
    ({"camera": "c1", "person_id": 1}, lambda r: r[1] == "c1" and r[2] == 1),
    ({"CAMERA": "c2", "Person_Id": 2}, lambda r: r[1] == "c2" and r[2] == 2),  # columns case-insensitive
    ({"score": 0.5}, lambda r: r[4] == 0.5),
    ({"person_id": 2.0}, lambda r: r[2] == 2),
    ({"camera": "x' OR '1'='1"}, lambda r: False),  # a value is a value, never SQL
    ({}, lambda r: True),  # no condition: every item
]


@pytest.mark.parametrize("filters,pred", DICT_CASES, ids=[str(c[0]) for c in DICT_CASES])
def test_dict_filter_matches_python(db, filters, pred):
    sql, params = compile_filter_dict(filters, COLUMNS)
    got = [r[0] for r in db.execute(f"SELECT id FROM items WHERE {sql} ORDER BY id", params)]
    assert got == [r[0] for r in ROWS if pred(r)]
    if filters:  # the text shown for it is the same filter: compile_filter reads it into the same SQL
        assert compile_filter(filter_text(filters), COLUMNS) == (sql, params)
        assert compile_where(filters, COLUMNS) == (sql, params)


def test_dict_filter_binds_values_and_checks_columns():
    sql, params = compile_filter_dict({"camera": "o'neil", "n": 3, "x": 1.5, "b": True}, ["camera", "n", "x", "b"])
    assert sql == '("camera" = ? AND "n" = ? AND "x" = ? AND "b" = ?)'
    assert params == ["o'neil", 3, 1.5, "true"]
    assert compile_filter_dict({"b": False}, ["b"]) == ('"b" = ?', ["false"])
    assert compile_filter_dict({}, ["camera"]) == ("1", [])
    with pytest.raises(FilterError, match="unknown filter column 'cam'.*known columns: camera"):
        compile_filter_dict({"cam": "c1"}, ["camera"])
    with pytest.raises(FilterError, match="finite number"):
        compile_filter_dict({"x": float("nan")}, ["x"])
    with pytest.raises(FilterError, match="string, a number or a boolean"):
        compile_filter_dict({"camera": ["c1", "c2"]}, ["camera"])


def test_filter_text_quotes_values():
    assert filter_text({"camera": "o'neil", "n": 3, "x": 1.5, "b": True}) == (
        "camera = 'o''neil' AND n = 3 AND x = 1.5 AND b = 'true'"
    )
    assert filter_text({}) is None


def test_the_index_takes_either_form(tmp_path):
    from tbps.index import GalleryIndex, build_index_from_features

    feats = np.eye(4, dtype=np.float32)
    paths = [str(tmp_path / f"p{i}.png") for i in range(4)]
    meta = {"camera": ["c1", "c2", "c1", "c3"], "person_id": [1, 1, 2, 3]}
    build_index_from_features(tmp_path / "idx", feats, paths, metadata=meta, fingerprint={"embed_dim": 4})
    with GalleryIndex.open(tmp_path / "idx") as ix:
        assert ix.filter_ids({"camera": "c1"}).tolist() == ix.filter_ids("camera = 'c1'").tolist()
        assert ix.filter_ids({"Camera": "c1", "person_id": 2}).tolist() == ix.filter_ids(
            "camera = 'c1' AND person_id = 2").tolist()
        assert len(ix.filter_ids({})) == 4
        by_dict = ix.search(feats[0], k=4, where={"person_id": 1})[0]
        by_text = ix.search(feats[0], k=4, where="person_id = 1")[0]
        assert [(h.id, h.score) for h in by_dict] == [(h.id, h.score) for h in by_text] and len(by_dict) == 2
        with pytest.raises(FilterError, match="unknown filter column 'colour'"):
            ix.search(feats[0], k=2, where={"colour": "red"})
        with pytest.raises(FilterError, match="out of range"):  # over SQLite's 64-bit integers: refused when compiled
            ix.filter_ids({"person_id": 10**30})
