"""Serving under load, the parts that make it cheap and must not change an answer: the text
encoder without padding, the batched index search, the shared BLAS thread limit, the batcher
answering coroutines, one bad query in a batch, and the response built as a dict."""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tbps.index import QueryError
from tests.test_index import write_images


# ---- the text encoder without padding ------------------------------------------------------


@pytest.fixture(scope="module")
def micro_encoder(tmp_path_factory):
    from tbps.retrieval.encoder import Encoder, create_untrained_checkpoint

    return Encoder.from_checkpoint(create_untrained_checkpoint(tmp_path_factory.mktemp("ck") / "best.pt",
                                                               arch="micro-vit", seed=5))


def test_unpadded_text_features_equal_the_padded_forward(micro_encoder, monkeypatch):
    from tbps.retrieval.encoder import tokenize_captions

    model = micro_encoder.model
    texts = ["red", "a woman in a long blue coat with a black handbag and white shoes", "a man in grey"]
    tokens = tokenize_captions(micro_encoder.tokenizer, texts, micro_encoder.max_words, micro_encoder.cleaning)
    ends = tokens.argmax(dim=-1)
    keep = model._unpadded_length(tokens)
    assert keep == int(ends.max()) + 1 < tokens.shape[1]  # it cuts, and keeps every end token
    with torch.no_grad():
        full, cut = model.encode_text(tokens), model.encode_text_unpadded(tokens)
        torch.testing.assert_close(cut, full, atol=1e-5, rtol=0)
        # the check has teeth: keeping one position fewer loses the longest query's end token
        with monkeypatch.context() as m:
            m.setattr(type(model), "_unpadded_length", lambda self, t: keep - 1)
            assert not torch.allclose(model.encode_text_unpadded(tokens), full, atol=1e-3)
        # a query that fills the context: nothing to cut, the padded forward itself
        long = tokenize_captions(micro_encoder.tokenizer, ["red " * 200], None, micro_encoder.cleaning)
        assert model._unpadded_length(long) is None
        assert torch.equal(model.encode_text_unpadded(long), model.encode_text(long))
    # Encoder.encode_texts takes this path: the same features as the padded one
    want = torch.nn.functional.normalize(full, dim=-1).numpy()
    np.testing.assert_allclose(micro_encoder.encode_texts(texts), want, atol=1e-5)


def test_unpadded_falls_back_when_attention_is_not_causal(micro_encoder):
    """Cutting is exact only under a causal mask; a mask changed in place is looked at again."""
    from tbps.retrieval.encoder import tokenize_captions

    import copy

    model = copy.deepcopy(micro_encoder.model)
    tokens = tokenize_captions(micro_encoder.tokenizer, ["a man in a red coat", "blue"], micro_encoder.max_words,
                               micro_encoder.cleaning)
    assert model._unpadded_length(tokens) is not None
    model.clip.attn_mask.zero_()  # every position sees every other: padding now matters
    assert model._unpadded_length(tokens) is None
    with torch.no_grad():
        assert torch.equal(model.encode_text_unpadded(tokens), model.encode_text(tokens))
    model.clip.text_pool_type = "last"
    assert model._unpadded_length(tokens) is None


# ---- the batched index search ------------------------------------------------------------


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    from tests.fake_encoder import FakeEncoder
    from tbps.index import GalleryIndex, build_index

    root = tmp_path_factory.mktemp("ix")
    enc = FakeEncoder(embed_dim=16, seed=1)
    write_images(root / "imgs", 40, seed=2)
    build_index(root / "idx", enc, root / "imgs", workers=0, progress=False)
    return GalleryIndex.open(root / "idx"), enc


def test_search_many_equals_search_one_by_one(small_index):
    ix, enc = small_index
    q = np.concatenate([enc.encode_texts(["a", "b c", "d e f", "g"]), np.asarray(ix.features[:3])])
    ks = [1, 5, 40, 100, 3, 7, 2]
    many = ix.search_many(q, ks)
    alone = [ix.search(q[i], k=k)[0] for i, k in enumerate(ks)]
    assert [[h.to_dict() for h in hits] for hits in many] == [[h.to_dict() for h in hits] for hits in alone]
    assert [len(h) for h in many] == [1, 5, 40, 40, 3, 7, 2]
    assert many[4][0].id == int(ix.ids[0]) and many[4][0].metadata["size"] > 0  # a gallery item finds itself
    with pytest.raises(QueryError, match="k must be"):
        ix.search_many(q[:2], [3, 0])
    with pytest.raises(QueryError, match="2 values of k for 3"):
        ix.search_many(q[:3], [3, 4])


class CountingBlas:
    """A stand-in for threadpoolctl's controller: counts the limits set and how many are in force."""

    def __init__(self):
        self.set, self.in_force = 0, 0

    def limit(self, limits, user_api):
        assert (limits, user_api) == (1, "blas")
        self.set += 1
        self.in_force += 1  # threadpoolctl sets the limit when the limiter is made
        ctl = self

        class Limiter:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                ctl.in_force -= 1

        return Limiter()


def test_blas_limit_is_set_once_per_outer_block(small_index, monkeypatch):
    """Setting BLAS's thread count costs more than searching a small gallery: a block inside
    another of the same thread keeps the outer limit; other threads set their own, as before."""
    from tbps.index import store

    ix, enc = small_index
    ctl = CountingBlas()
    monkeypatch.setattr(store, "_BLAS", ctl)
    with store._blas_threads(1):
        with store._blas_threads(1):
            assert (ctl.set, ctl.in_force) == (1, 1)
        assert ctl.in_force == 1
        seen = []

        def other_thread():
            with store._blas_threads(1):
                seen.append((ctl.set, ctl.in_force))

        other = threading.Thread(target=other_thread)
        other.start()
        other.join()
        assert seen == [(2, 2)]  # another thread sets its own
    assert ctl.in_force == 0
    ctl.set = 0
    q = enc.encode_texts(["a", "b", "c", "d", "e", "f", "g"])
    ix.search_many(q, [3] * 7)
    assert (ctl.set, ctl.in_force) == (1, 0)  # seven queries, one limit
    for row in q:
        ix.search(row, k=3)
    assert ctl.set == 8


# ---- the batcher, answering coroutines -------------------------------------------------------


def test_batcher_answers_awaiting_requests_and_keeps_errors_to_their_own():
    from tbps.serve.runtime import TextBatcher

    gate = threading.Event()
    finished: list[list] = []

    def encode(texts):
        gate.wait(5)
        if "boom" in texts:
            raise RuntimeError("encoder boom")
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)

    def finish(jobs):
        finished.append([job for job, _ in jobs])
        return [ValueError(f"bad {job}") if job == "bad" else (job, float(feat[0])) for job, feat in jobs]

    b = TextBatcher(encode, threading.Lock(), max_batch=8, finish=finish)

    async def main():
        first = asyncio.ensure_future(b.encode("x", "first"))
        await asyncio.sleep(0.2)  # the first batch is in the encoder, held at the gate
        rest = [asyncio.ensure_future(b.encode(t, job)) for t, job in
                [("aa", "one"), ("bbb", "bad"), ("cccc", None), ("ddddd", "two")]]
        gone = asyncio.ensure_future(b.encode("eeeeee", "gone"))
        await asyncio.sleep(0.2)
        assert b.waiting == 5
        gone.cancel()  # its client left: its answer is dropped, nobody else is disturbed
        gate.set()
        out = await asyncio.gather(first, *rest, return_exceptions=True)
        with pytest.raises(RuntimeError, match="encoder boom"):
            await b.encode("boom", "job")
        return out

    out = asyncio.run(main())
    assert out[0] == ("first", 1.0) and out[1] == ("one", 2.0) and out[4] == ("two", 5.0)
    assert isinstance(out[2], ValueError) and str(out[2]) == "bad bad"
    assert isinstance(out[3], np.ndarray) and float(out[3][0]) == 4.0  # no job: the feature itself
    assert finished[:2] == [["first"], ["one", "bad", "two", "gone"]]  # one finish call per batch
    assert b.batches == 2 and b.queries == 6
    assert b("again")[0] == 5.0  # the blocking form still works, on the same worker
    b.close()


# ---- the server: one bad query in a batch, the response built as a dict ----------------------


@pytest.fixture(scope="module")
def colour_index(tmp_path_factory):
    from tests.test_serve import ColourEncoder, open_gallery_index

    return open_gallery_index(tmp_path_factory.mktemp("colours"), ColourEncoder())


def test_a_bad_filter_fails_only_its_own_request_in_a_batch(colour_index):
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from tbps.serve import create_app
    from tests.test_serve import HeldEncoder, assert_same_ranking, naive_ranking

    held, index = HeldEncoder(), colour_index  # the same features as the index's ColourEncoder
    first = {"text": "red", "k": 3}
    bodies = [{"text": "blue", "k": 2, "filters": "nope = 1"}, {"text": "green white", "k": 4},
              {"text": "black", "k": 10, "filters": {"camera": "c1"}}, {"text": "yellow", "k": 1}]
    with TestClient(create_app(index, held)) as c:
        held.hold(c.app.state.batcher, 1 + len(bodies))  # the first call waits for all the others to queue
        with ThreadPoolExecutor(1 + len(bodies)) as pool:
            head = pool.submit(c.post, "/search", json=first)
            assert held.held.wait(30)  # the first query is in the encoder: the other four make the next batch
            rest = [pool.submit(c.post, "/search", json=body) for body in bodies]
            answers = [head.result(), *(f.result() for f in rest)]
    assert held.calls[-2:] == [1, 4], held.calls
    assert [r.status_code for r in answers] == [200, 422, 200, 200, 200]
    assert "nope" in answers[1].json()["detail"]
    for body, r in zip([first, *bodies], answers):
        if r.status_code == 200:
            camera = body["filters"]["camera"] if isinstance(body.get("filters"), dict) else None
            ref = naive_ranking(held, index, body["text"], camera=camera)
            assert_same_ranking([(h["id"], h["score"]) for h in r.json()["results"]], ref)
            assert len(r.json()["results"]) == min(body["k"], len(ref))


def test_metadata_is_made_json_safe_exactly_as_before():
    from tbps.serve.routes import _jsonable, _jsonable_record

    records = [
        {"camera": "c1", "size": 120, "mtime": 1.5, "note": None},  # as SQLite returns it: copied
        {"score": float("nan"), "big": float("inf"), "ok": 2.0},
        {"n": np.int64(3), "f": np.float32(0.25), "b": b"\xffab", "flag": True, "p": Path("/x/y.jpg")},
        {1: "int key", "nested": {"a": [1, float("-inf")]}},
    ]
    for rec in records:
        got = _jsonable_record(rec)
        assert got == _jsonable(dict(rec)) and got is not rec
        assert [type(v) for v in got.values()] == [type(v) for v in _jsonable(dict(rec)).values()]
    assert _jsonable_record(records[1]) == {"score": None, "big": None, "ok": 2.0}
    assert math.isnan(records[1]["score"])  # the record itself is left alone


def test_host_verdicts_are_remembered_but_bounded(colour_index):
    from fastapi.testclient import TestClient

    from tbps.serve import create_app
    from tbps.serve.runtime import HostCheck
    from tests.test_serve import ColourEncoder

    app = create_app(colour_index, ColourEncoder(), allowed_hosts=["gallery.lan"])
    with TestClient(app) as c:
        for i in range(100):
            assert c.get("/health", headers={"Host": f"evil{i}.example"}).status_code == 421
        assert c.get("/health", headers={"Host": "gallery.lan:8000"}).status_code == 200
        assert c.get("/health", headers={"Host": "evil3.example"}).status_code == 421  # remembered: still no
        check = app.middleware_stack
        while not isinstance(check, HostCheck):
            check = check.app
        assert len(check._known) == 64 and check._known["evil3.example"] is False
        assert "gallery.lan:8000" not in check._known  # seen after the table filled: checked each time


def test_serve_keeps_what_it_loaded_out_of_full_collections(micro_encoder, tmp_path, monkeypatch, capsys):
    """`tbps serve` freezes the objects it loaded before serving: a full collection of the
    model's heap stopped every request for ~300 ms every few seconds under load."""
    import gc

    import uvicorn

    from tbps.cli.main import main
    from tbps.index import build_index
    from tests.test_serve import make_gallery

    images, meta = make_gallery(tmp_path)
    build_index(tmp_path / "index", micro_encoder, images, metadata_csv=meta, progress=False,
                checkpoint=micro_encoder.checkpoint)
    frozen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: frozen.append(gc.get_freeze_count()))
    gc.unfreeze()
    try:
        code = main(["serve", str(tmp_path / "index"), "--port", "0"])
    finally:
        gc.unfreeze()  # the test process collects as usual
    assert code == 0, capsys.readouterr().err
    assert frozen and frozen[0] > 10_000  # the model's and the app's objects, at least
    assert gc.get_freeze_count() == 0  # and let go once the server returns
