"""One place encodes: evaluation, the gallery index and MeFa's image bank give the same features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbps.data.layouts import load_annotations
from tbps.retrieval.encoder import Encoder, create_untrained_checkpoint, encode_captions, encode_images


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = create_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", arch="micro-vit", seed=3)
    return Encoder.from_checkpoint(path)


def test_indexed_features_equal_evaluated_features(tiny_dataset, encoder, tmp_path):
    from tbps.index import GalleryIndex, build_index

    records = load_annotations(tiny_dataset, progress=False).split("test")
    paths = [r.image for r in records]
    evaluated = encode_images(encoder.model, paths, batch_size=5, progress=False).numpy()  # (G, D)
    build_index(tmp_path / "idx", encoder, tiny_dataset / "imgs" / "test", workers=0, progress=False)
    with GalleryIndex.open(tmp_path / "idx") as ix:
        by_path = {ix.get(int(i)).path: ix.feature(int(i)) for i in ix.ids}
    indexed = np.stack([by_path[str(p)] for p in paths])
    assert indexed.shape == evaluated.shape and len(paths) > 4
    np.testing.assert_allclose(indexed, evaluated, atol=1e-5)
    # Not the trivial case: the images are told apart.
    assert np.abs(evaluated[0] - evaluated[1]).max() > 1e-3


def test_query_features_equal_evaluated_caption_features(tiny_dataset, encoder):
    captions = [c for r in load_annotations(tiny_dataset, progress=False).split("test")[:4] for c in r.captions]
    evaluated = encode_captions(encoder.model, encoder.tokenizer, captions, batch_size=3,
                                max_words=encoder.max_words, progress=False).numpy()
    np.testing.assert_allclose(encoder.encode_texts(captions), evaluated, atol=1e-5)
    assert np.abs(evaluated[0] - evaluated[-1]).max() > 1e-3


def test_mefa_image_bank_equals_evaluated_features(tiny_dataset, encoder):
    from tbps.data.dataset import TrainPairs
    from tbps.data.negatives.image import bank_batches
    from tbps.retrieval.encoder import encode_image_batches

    model = encoder.model.train()  # the bank is refreshed mid-training: it must encode in eval mode
    records = load_annotations(tiny_dataset, progress=False).split("train")[:9]
    spec = model.spec
    ds = TrainPairs(records, model.image_size, mean=spec.mean, std=spec.std, augment=None, text_augment=None)
    bank = encode_image_batches(model, bank_batches(ds, batch_size=4))
    assert model.training  # mode restored
    evaluated = encode_images(model, [r.image for r in records], batch_size=4, progress=False)
    # The bank decodes through TrainPairs (resize then tensor), evaluation through GalleryImages: same pixels.
    torch.testing.assert_close(bank, evaluated, atol=1e-5, rtol=0)
