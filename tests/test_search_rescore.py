"""ITM re-scoring at search time: `tbps search --rescore` and `tbps serve --rescore`.

A micro LAIP checkpoint (the real LAIP objective's state, random weights: re-scoring only has
to follow its ITM head, trained or not) indexes the tiny dataset's test images. The re-scored
results must be the plain top K, re-ordered by the scores ``SearchRescorer`` gives those
pairs directly; the REST route must answer what the CLI prints.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tbps.cli.main import main
from tbps.threads import torch_threads
from tests.conftest import MICRO

TEXTS = ["a man in a red shirt and black trousers", "a woman with a blue bag", "a person in white shoes"]


def _save(path, model, objective_state: dict, recipe: dict):
    from tbps.models.checkpoint import save_checkpoint

    return save_checkpoint(path, {"model_spec": model.spec.to_dict(), "model": model.state_dict(),
                                  "objective": objective_state, "recipe": recipe, "epoch": 0, "step_in_epoch": 0,
                                  "global_step": 0, "history": [], "best": None})


def _build(tmp, name, ckpt, images) -> str:
    idx = tmp / name
    rc = main(["index", "build", str(idx), "--checkpoint", str(ckpt), "--images", str(images), "--workers", "0",
               "--no-progress", "--json"])
    assert rc == 0
    return str(idx)


@pytest.fixture(scope="module")
def laip(tiny_dataset, tmp_path_factory):
    """(LAIP index, its checkpoint, IRRA index, fusion-less index, an image): micro models, test images."""
    from tbps.recipes.config import load_recipe
    from tbps.data.layouts import load_annotations
    from tbps.models import create_model
    from tbps.objectives import build_objective

    with torch_threads(1):  # restored after, for the tests that follow
        tmp = tmp_path_factory.mktemp("rescore")
        images = tmp / "gallery"
        images.mkdir()
        for i, rec in enumerate(load_annotations(tiny_dataset, progress=False).split("test")):
            shutil.copy(rec.image, images / f"{i:03d}.jpg")
        r = load_recipe("laip-cpu", MICRO + ["losses.fusion.width=32", "losses.fusion.heads=2",
                                             "losses.itc.queue_size=32"])
        torch.manual_seed(0)
        model = create_model(r.model)
        objective = build_objective("laip", model, r.losses, num_identities=4)
        recipe = r.to_dict()
        ckpt = _save(tmp / "laip.pt", model, objective.state_dict(), recipe)
        # The same weights under IRRA (fusion trained for MLM only) and with no fusion encoder at all.
        irra = _save(tmp / "irra.pt", model, objective.state_dict(), {**recipe, "objective": "irra"})
        clip = _save(tmp / "clip.pt", model, {}, {**recipe, "objective": "tbps-clip", "losses": {"itc": {}}})
        few = tmp / "few"
        few.mkdir()
        for p in sorted(images.iterdir())[:3]:
            shutil.copy(p, few / p.name)
        yield (_build(tmp, "idx", ckpt, images), ckpt, _build(tmp, "irra-idx", irra, few),
               _build(tmp, "clip-idx", clip, few), sorted(few.iterdir())[0])


def _search(capsys, *argv):
    rc = main(["search", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _direct_scores(ckpt, idx, text, ids, cosines, mode):
    """SearchRescorer's scores of the pairs (text, ids), asked directly (no index search)."""
    from tbps.index import GalleryIndex
    from tbps.retrieval.rescore import SearchRescorer

    rescorer = SearchRescorer.from_checkpoint(ckpt, mode=mode)
    with GalleryIndex.open(idx) as ix:
        return rescorer.for_texts([text])(None, np.array([ids]), np.array([cosines]), ix)[0]


@pytest.mark.parametrize("mode", ["itm", "itm+itc"])
def test_search_rescore_reorders_the_top_k_as_the_itm_head_scores_them(laip, capsys, mode):
    idx, ckpt = laip[0], laip[1]
    k = 6
    moved = 0
    for text in TEXTS:
        rc, out, err = _search(capsys, idx, text, "-k", k, "--json")
        assert rc == 0, err
        plain = json.loads(out)
        assert plain["rescored"] is False and plain["rescore"] is None
        rc, out, err = _search(capsys, idx, text, "-k", k, "--rescore", k, "--rescore-mode", mode, "--json")
        assert rc == 0, err
        got = json.loads(out)
        assert got["rescored"] is True and got["rescore"]["k"] == k and got["rescore"]["candidates"] == k
        assert got["rescore"]["mode"] == mode and got["rescore"]["ms"] > 0
        assert (got["rescore"]["weight"] == 0.002) == (mode == "itm+itc")
        by_id = {h["id"]: h for h in plain["results"]}
        assert {h["id"] for h in got["results"]} == set(by_id)  # same top-K set
        for h in got["results"]:  # stage-1 cosine kept beside the new score
            assert h["cosine"] == pytest.approx(by_id[h["id"]]["score"], abs=1e-6)
        # The scores SearchRescorer gives these pairs directly, and the order they imply.
        direct = _direct_scores(ckpt, idx, text, list(by_id), [h["score"] for h in by_id.values()], mode)
        want = sorted(zip(by_id, direct), key=lambda t: (-t[1], t[0]))
        assert [h["id"] for h in got["results"]] == [i for i, _ in want]
        assert [h["score"] for h in got["results"]] == pytest.approx([s for _, s in want], abs=1e-5)
        moved += [h["id"] for h in got["results"]] != [h["id"] for h in plain["results"]]
    assert moved  # the ITM head did re-order something


def test_results_past_the_rescored_top_keep_their_cosine_order_below(laip, capsys):
    idx = laip[0]
    rc, out, _ = _search(capsys, idx, TEXTS[0], "-k", 10, "--json")
    plain = [h["id"] for h in json.loads(out)["results"]]
    rc, out, err = _search(capsys, idx, TEXTS[0], "-k", 10, "--rescore", 4, "--json")
    assert rc == 0, err
    got = json.loads(out)
    ids, scores = [h["id"] for h in got["results"]], [h["score"] for h in got["results"]]
    assert got["rescore"]["candidates"] == 4
    assert set(ids[:4]) == set(plain[:4]) and ids[4:] == plain[4:]
    assert all(0 <= s <= 1 for s in scores[:4]) and all(s <= -1 for s in scores[4:])
    # The table: score and cosine columns, and a note on stderr with the time.
    rc, out, err = _search(capsys, idx, TEXTS[0], "-k", 3, "--rescore")
    assert rc == 0 and "cosine" in out.splitlines()[0] and len(out.splitlines()) == 4
    assert "re-scored the top" in err and " ms" in err


@pytest.mark.parametrize(
    ("which", "extra", "message"),
    [
        (0, ["--image", "IMG", "--rescore"], "cannot be used with --image"),
        (0, ["TEXT", "--rescore", "0"], "--rescore must be a positive integer"),
        (0, ["TEXT", "--rescore-mode", "itm+itc"], "need --rescore"),
        (0, ["TEXT", "--rescore", "--rescore-weight", "0.1"], "itm+itc"),
        (2, ["TEXT", "--rescore"], "IRRA trains its fusion encoder for MLM only"),
        (3, ["TEXT", "--rescore"], "no fusion encoder to re-score with"),
    ],
)
def test_search_rescore_user_errors_are_one_line(laip, capsys, which, extra, message):
    argv = [str(laip[4]) if a == "IMG" else TEXTS[0] if a == "TEXT" else a for a in extra]
    rc, out, err = _search(capsys, laip[which], *argv)
    assert rc == 2 and out == "" and err.startswith("tbps: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_rest_rescore_equals_the_cli(laip, capsys):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tbps.cli.serve import load_app

    idx, text = laip[0], TEXTS[1]
    rc, out, _ = _search(capsys, idx, text, "-k", 5, "--rescore", 8, "--json")
    cli = json.loads(out)["results"]
    rc, out, _ = _search(capsys, idx, text, "-k", 5, "--json")
    cli_plain = json.loads(out)["results"]
    with TestClient(load_app(idx, rescore=8)) as c:
        assert c.get("/stats").json()["rescore"] == {"available": True, "k": 8, "mode": "itm", "weight": None}
        r = c.post("/search", json={"text": text, "k": 5, "rescore": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["rescored"] is True and body["rescore_ms"] > 0
        assert [h["id"] for h in body["results"]] == [h["id"] for h in cli]
        assert [h["score"] for h in body["results"]] == pytest.approx([h["score"] for h in cli], abs=1e-6)
        assert [h["cosine"] for h in body["results"]] == pytest.approx([h["cosine"] for h in cli], abs=1e-6)
        # Without the field: the plain ranking, as `tbps search` without --rescore.
        body = c.post("/search", json={"text": text, "k": 5}).json()
        assert body["rescored"] is False and body["rescore_ms"] is None
        assert [h["id"] for h in body["results"]] == [h["id"] for h in cli_plain]
        assert all(h["cosine"] is None for h in body["results"])
        assert c.post("/search", json={"text": text, "rescore": "yes"}).status_code == 422
    # A server started without --rescore says so.
    with TestClient(load_app(idx)) as c:
        assert c.get("/stats").json()["rescore"] == {"available": False}
        r = c.post("/search", json={"text": text, "k": 5, "rescore": True})
        assert r.status_code == 422 and "--rescore" in r.json()["detail"]


def test_serve_rescore_flags(laip, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))

    def serve(*argv):
        code = main(["serve", *map(str, argv), "--port", "0"])
        return code, capsys.readouterr().err

    code, err = serve(laip[0], "--rescore", "--rescore-mode", "itm+itc", "--rescore-weight", "0.5")
    assert code == 0, err
    from fastapi.testclient import TestClient

    with TestClient(apps[-1], base_url="http://127.0.0.1:8000") as c:
        assert c.get("/stats").json()["rescore"] == {"available": True, "k": 128, "mode": "itm+itc", "weight": 0.5}
    for argv, message in [
        ((laip[3], "--rescore"), "no fusion encoder to re-score with"),
        ((laip[2], "--rescore", "16"), "IRRA"),
        ((laip[0], "--rescore", "--rerank", "jaccard"), "alternatives"),
        ((laip[0], "--rescore", "-3"), "positive"),
    ]:
        code, err = serve(*argv)
        assert code == 2 and err.startswith("tbps: error:") and message in err, (argv, err)
    assert len(apps) == 1


def test_page_offers_rescoring_only_when_the_server_can(laip):
    """The "Re-score" box in a real browser (skipped without Chromium)."""
    import os

    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("/usr/bin/chromium is absent")
    sync_api = pytest.importorskip("playwright.sync_api")
    pytest.importorskip("uvicorn")
    from tbps.cli.serve import load_app
    from tests.test_web_browser import CHROMIUM, CHROMIUM_ARGS, ServerThread

    idx, text = laip[0], TEXTS[0]
    servers = [ServerThread(load_app(idx, rescore=8)).start(), ServerThread(load_app(idx)).start()]
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{servers[0].url}/?q={text.replace(' ', '+')}&k=5")
            page.wait_for_function("() => document.querySelector('#status').textContent.includes('re-scored')")
            assert page.is_visible("#rescore") and page.is_checked("#rescore")
            shown = page.eval_on_selector_all("#results .card", "cs => cs.map(c => +c.dataset.id)")
            import urllib.request

            req = urllib.request.Request(f"{servers[0].url}/search", method="POST",
                                         data=json.dumps({"text": text, "k": 5, "rescore": True}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req) as resp:
                assert shown == [h["id"] for h in json.load(resp)["results"]]
            page.uncheck("#rescore")  # searches again, plainly; the URL remembers it
            page.wait_for_function("() => !document.querySelector('#status').textContent.includes('re-scored')")
            assert "rescore=0" in page.url
            page.goto(f"{servers[1].url}/?q=red&k=5")
            page.wait_for_selector("#results .card")
            assert not page.is_visible("#rescore")
            browser.close()
            assert not errors, errors
    finally:
        for s in servers:
            s.stop()


# ---- one text pass per re-scored query ------------------------------------------------------


@pytest.fixture()
def text_passes(monkeypatch):
    """Queries run through the model's text tower, by entry point: ``encode_text`` (stage 1 alone,
    also as ``encode_text_unpadded``, the query encoder's way) and ``text_tokens`` (the token maps,
    whose pooled output is the stage-1 feature too). A call made inside another counts once."""
    from tbps.models.tbps_model import TBPSModel

    counts = {"encode_text": 0, "text_tokens": 0}
    inside: list[str] = []
    for name, key in (("encode_text", "encode_text"), ("encode_text_unpadded", "encode_text"),
                      ("text_tokens", "text_tokens")):
        def counted(self, tokens, _orig=getattr(TBPSModel, name), _key=key):
            if not inside:
                counts[_key] += len(tokens)
            inside.append(_key)
            try:
                return _orig(self, tokens)
            finally:
                inside.pop()

        monkeypatch.setattr(TBPSModel, name, counted)
    return counts


def _micro_model(kind, tmp_path, monkeypatch):
    from tbps.models import create_model
    from tbps.models.factory import ModelSpec

    monkeypatch.setenv("TBPS_CACHE", str(tmp_path))
    spec = {"clip": ModelSpec(arch="micro-vit"),
            "clip+head": ModelSpec(arch="micro-vit", embed_dim=24),  # a text_head after the CLIP tower
            "stream": ModelSpec(arch="micro-vit", text_tower={"source": "random", "hidden": 16, "dim": 12},
                                embed_dim=24)}[kind]
    torch.manual_seed(0)
    model = create_model(spec, load_pretrained=False)
    if kind == "stream":
        model.prepare_vocabulary(["a man in a red shirt and black trousers", "a woman with a blue bag"])
    return model.eval()


@pytest.mark.parametrize("kind", ["clip", "clip+head", "stream"])
def test_the_text_pass_of_a_rescorer_gives_the_stage1_feature(kind, tmp_path, monkeypatch):
    """for_texts' one pass: query_features equal Encoder.encode_texts (same cleaning, same
    tokens, text_tokens' pooled output = encode_text's, normalised the same way)."""
    from tbps.models.fusion import FusionEncoder
    from tbps.retrieval.encoder import Encoder
    from tbps.retrieval.rescore import SearchRescorer

    model = _micro_model(kind, tmp_path, monkeypatch)
    encoder = Encoder(model, fingerprint={"embed_dim": model.embed_dim}, max_words=8)
    fusion = FusionEncoder(model.embed_dim, width=16, layers=1, heads=2, mlp_ratio=2.0, vocab_size=10)
    rescorer = SearchRescorer(model, fusion, encoder.tokenizer, max_words=encoder.max_words)
    texts = TEXTS + ["A man; in a RED shirt!!  (black) trousers, and a bag with nine more words here", "?"]
    bound = rescorer.for_texts(texts)
    want = encoder.encode_texts(texts)
    assert bound.query_features.dtype == np.float32 and bound.query_features.shape == want.shape
    np.testing.assert_allclose(bound.query_features, want, rtol=0, atol=1e-6)
    assert bound.words.shape[:2] == bound.mask.shape and bound.words.shape[0] == len(texts)


def test_a_rescored_query_runs_the_text_tower_once(laip, capsys, text_passes):
    """`tbps search --rescore` and `POST /search {"rescore": true}`: one text pass per query."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from tbps.cli.serve import load_app

    idx = laip[0]
    rc, out, err = _search(capsys, idx, TEXTS[0], "-k", 5, "--rescore", 8, "--json")
    assert rc == 0 and json.loads(out)["rescored"] is True, err
    assert text_passes == {"encode_text": 0, "text_tokens": 1}
    with TestClient(load_app(idx, rescore=8)) as c:
        for k in text_passes:
            text_passes[k] = 0
        r = c.post("/search", json={"text": TEXTS[1], "k": 5, "rescore": True})
        assert r.status_code == 200 and r.json()["rescored"] is True, r.text
        assert text_passes == {"encode_text": 0, "text_tokens": 1}
        r = c.post("/search", json={"text": TEXTS[1], "k": 5})  # plain: the encoder alone
        assert r.status_code == 200 and r.json()["rescored"] is False
        assert text_passes == {"encode_text": 1, "text_tokens": 1}
