"""Chunked retrieval metrics against the naive full-argsort reference, a numpy full sort and
hand-computed values; the ranked positions themselves against a stable argsort."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tbps.retrieval.metrics import (
    MetricsError,
    default_chunk_size,
    evaluate_both,
    naive_retrieval_metrics,
    retrieval_metrics,
)
from tbps.retrieval.positions import chunk_positions

KEYS = ("R1", "R5", "R10", "mAP", "mINP")


def assert_close(got, want, tol=1e-4):
    assert set(got) == set(want), (got, want)
    for k in want:
        assert abs(got[k] - want[k]) <= tol, (k, got[k], want[k])


@pytest.fixture(params=["fine_bins", "coarse_bins"])
def binning(request, monkeypatch):
    """Run a test with the default bins (few items share a bin) and with 16 bins a row, where
    most items, and several correct items, share a bin and the exact comparisons do the work."""
    import tbps.retrieval.positions as p

    if request.param == "coarse_bins":
        monkeypatch.setattr(p, "ITEMS_PER_BIN", 10**9)
    return request.param


def random_case(q, g, n_ids, seed, quantum=None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    gids = torch.randint(0, n_ids, (g,), generator=gen)
    qids = gids[torch.randint(0, g, (q,), generator=gen)]  # every query has a correct item
    # Scores correlated with the ids, so positions spread over the whole range.
    sim = torch.randn(q, g, generator=gen) + 1.5 * (qids[:, None] == gids[None, :])
    if quantum is not None:
        sim = (sim / quantum).round() * quantum  # many exact ties
    return sim.to(dtype), qids, gids


def test_hand_computed_example():
    # Query 0 (id 1): ranking 3, 0, 2, 1 -> ids 2, 1, 1, 2: correct at positions 2 and 3.
    #   AP = (1/2 + 2/3) / 2 = 7/12, INP = 2/3, not in top 1, in top 5.
    # Query 1 (id 2): ranking 1, 3, 0, 2 (g1 == g3 == 0.8: lower index first) -> ids 2, 2, 1, 1.
    #   AP = (1/1 + 2/2) / 2 = 1, INP = 2/2 = 1.
    sim = torch.tensor([[0.5, 0.1, 0.3, 0.9], [0.2, 0.8, 0.1, 0.8]])
    qids = torch.tensor([1, 2])
    gids = torch.tensor([1, 2, 1, 2])
    want = {"R1": 50.0, "R5": 100.0, "R10": 100.0, "mAP": 100 * (7 / 12 + 1) / 2, "mINP": 100 * (2 / 3 + 1) / 2}
    for chunk in (1, 2, None):
        assert_close(retrieval_metrics(sim, qids, gids, chunk_size=chunk), want, 1e-9)
    assert_close(naive_retrieval_metrics(sim, qids, gids), want, 1e-9)


def test_only_positive_last_gives_minp():
    # One correct item, ranked last of 5: AP = INP = 1/5, R@1 = R@5 = 0 / 100.
    sim = np.array([[0.9, 0.8, 0.7, 0.6, 0.1]], dtype=np.float32)
    got = retrieval_metrics(sim, np.array([7]), np.array([1, 2, 3, 4, 7]), ks=(1, 4, 5))
    assert_close(got, {"R1": 0.0, "R4": 0.0, "R5": 100.0, "mAP": 20.0, "mINP": 20.0}, 1e-9)
    # Two correct items at positions 1 and 5: INP = 2/5, AP = (1 + 2/5) / 2.
    got = retrieval_metrics(sim, np.array([7]), np.array([7, 2, 3, 4, 7]))
    assert_close(got, {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 70.0, "mINP": 40.0}, 1e-9)


@pytest.mark.parametrize("q,g,n_ids", [(1, 1, 1), (5, 3, 2), (37, 53, 6), (120, 300, 25), (64, 1000, 200)])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_matches_naive_random(q, g, n_ids, chunk, binning):
    sim, qids, gids = random_case(q, g, n_ids, seed=q * 1000 + g)
    assert_close(retrieval_metrics(sim, qids, gids, chunk_size=chunk), naive_retrieval_metrics(sim, qids, gids))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("quantum", [None, 0.25, 0.01])
def test_matches_naive_dtypes_and_ties(dtype, quantum, binning):
    sim, qids, gids = random_case(90, 400, 20, seed=3, quantum=quantum, dtype=dtype)
    want = naive_retrieval_metrics(sim, qids, gids)
    assert_close(retrieval_metrics(sim, qids, gids, chunk_size=16), want)
    if dtype != torch.bfloat16:  # numpy has no bfloat16
        assert_close(retrieval_metrics(sim.numpy(), qids.numpy(), gids.numpy(), chunk_size=16), want)


def test_ties_follow_stable_argsort(binning):
    # All scores equal: the order is the gallery index, so the positions are the indices.
    gids = torch.tensor([0, 1, 0, 1, 1, 0])
    sim = torch.zeros(2, 6)
    got = retrieval_metrics(sim, torch.tensor([0, 1]), gids)
    # id 0 at positions 0, 2, 5: AP = (1 + 2/3 + 3/6) / 3, INP = 3/6.
    # id 1 at positions 1, 3, 4: AP = (1/2 + 2/4 + 3/5) / 3, INP = 3/5.
    ap = ((1 + 2 / 3 + 0.5) / 3 + (0.5 + 0.5 + 0.6) / 3) / 2
    assert_close(got, {"R1": 50.0, "R5": 100.0, "R10": 100.0, "mAP": 100 * ap, "mINP": 100 * (0.5 + 0.6) / 2}, 1e-9)
    # -0.0 and +0.0 are equal scores, like the argsort treats them.
    sim = torch.tensor([[0.0, -0.0, 0.0, 1.0, -0.0]])
    gids = torch.tensor([3, 5, 3, 3, 5])
    for q in (3, 5):
        qids = torch.tensor([q])
        assert_close(retrieval_metrics(sim, qids, gids), naive_retrieval_metrics(sim, qids, gids), 1e-9)
    # A constant row next to ordinary rows, and infinite scores (rows without usable bins).
    sim, qids, gids = random_case(20, 50, 5, seed=9)
    sim[3] = 0.25
    sim[5, 7] = float("inf")
    sim[6, ::3] = float("-inf")
    sim[8] = float("-inf")
    assert_close(retrieval_metrics(sim, qids, gids, chunk_size=6), naive_retrieval_metrics(sim, qids, gids))


def test_tie_between_correct_and_wrong_item():
    # The wrong item (index 0) ties with the correct one (index 1): it ranks first.
    sim = torch.tensor([[0.5, 0.5, 0.1]])
    got = retrieval_metrics(sim, torch.tensor([1]), torch.tensor([0, 1, 0]))
    assert got["R1"] == 0.0 and got["mAP"] == pytest.approx(50.0)
    # Swapped indices: now the correct item comes first.
    got = retrieval_metrics(sim, torch.tensor([1]), torch.tensor([1, 0, 0]))
    assert got["R1"] == 100.0 and got["mAP"] == pytest.approx(100.0)


def test_missing_queries_raise_or_skip():
    sim, qids, gids = random_case(30, 80, 10, seed=5)
    qids = qids.clone()
    qids[[4, 17]] = 999  # no gallery item has id 999
    with pytest.raises(MetricsError, match="2 of 30 queries.*row 4 \\(id 999\\)"):
        retrieval_metrics(sim, qids, gids)
    with pytest.raises(MetricsError, match="2 of 30 queries"):
        naive_retrieval_metrics(sim, qids, gids)
    got = retrieval_metrics(sim, qids, gids, skip_missing=True, chunk_size=4)
    want = naive_retrieval_metrics(sim, qids, gids, skip_missing=True)
    assert got["num_skipped"] == want["num_skipped"] == 2
    keep = qids != 999
    assert_close({k: got[k] for k in KEYS}, retrieval_metrics(sim[keep], qids[keep], gids))
    assert_close(got, want)
    with pytest.raises(MetricsError, match="none of the 1 queries"):
        retrieval_metrics(sim[:1], torch.tensor([999]), gids, skip_missing=True)


def test_bad_inputs_raise_clear_errors():
    sim = torch.rand(4, 6)
    with pytest.raises(MetricsError, match="shape mismatch.*\\(4, 6\\).*3 query ids"):
        retrieval_metrics(sim, torch.arange(3), torch.arange(6))
    with pytest.raises(MetricsError, match="7 gallery ids"):
        retrieval_metrics(sim, torch.arange(4), torch.arange(7))
    with pytest.raises(MetricsError, match="2-D"):
        retrieval_metrics(torch.rand(4), torch.arange(4), torch.arange(4))
    with pytest.raises(MetricsError, match="integers"):
        retrieval_metrics(sim, torch.rand(4), torch.arange(6))
    with pytest.raises(MetricsError, match="chunk_size"):
        retrieval_metrics(sim, torch.arange(4), torch.arange(6), chunk_size=0)
    bad = sim.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(MetricsError, match="NaN.*row 2"):
        retrieval_metrics(bad, torch.arange(4), torch.arange(6), chunk_size=2)
    assert MetricsError.user_error is True


def test_evaluate_both_is_the_transpose():
    sim, tids, iids = random_case(60, 25, 8, seed=11)
    tids = iids[torch.arange(60) % 25]  # every image has captions, every caption an image
    both = evaluate_both(sim, tids, iids, chunk_size=9)
    assert_close(both["t2i"], naive_retrieval_metrics(sim, tids, iids))
    assert_close(both["i2t"], naive_retrieval_metrics(sim.T.contiguous(), iids, tids))
    both_np = evaluate_both(sim.numpy(), tids.numpy(), iids.numpy())
    assert_close(both_np["i2t"], both["i2t"])


def test_default_chunk_size_follows_budget():
    assert default_chunk_size(19_848) >= 1
    assert default_chunk_size(19_848, memory_budget=1) == 1
    assert default_chunk_size(1000, memory_budget=2**30) > default_chunk_size(1000, memory_budget=2**20)


def test_float64_bin_numbers_for_large_chunks(monkeypatch, binning):
    # Chunks with more than 2**23 bins compute bin numbers in float64; force that path.
    import tbps.retrieval.positions as p

    monkeypatch.setattr(p, "FLOAT32_BIN_LIMIT", 0)
    sim, qids, gids = random_case(50, 120, 9, seed=2, quantum=0.05)
    assert_close(retrieval_metrics(sim, qids, gids, chunk_size=13), naive_retrieval_metrics(sim, qids, gids))


def numpy_full_sort_metrics(sim, qids, gids, ks=(1, 5, 10)):
    """What a user writes: a stable argsort of every row, then matches, cumsums, AP, INP."""
    order = np.argsort(-sim, axis=1, kind="stable")
    matches = gids[order] == qids[:, None]
    cmc = matches.cumsum(1)
    rows, pos = np.nonzero(matches)
    num_rel = matches.sum(1)
    ap = np.bincount(rows, weights=cmc[rows, pos] / (pos + 1.0), minlength=len(qids)) / num_rel
    last = np.zeros(len(qids), dtype=np.int64)
    np.maximum.at(last, rows, pos)
    out = {f"R{k}": 100.0 * float(np.mean(matches.argmax(1) < k)) for k in ks}
    out["mAP"] = 100.0 * float(np.mean(ap))
    out["mINP"] = 100.0 * float(np.mean(num_rel / (last + 1.0)))
    return out


def stable_positions(x, rows, cols):
    """Reference: 0-based position of (row, col) in the row's stable descending argsort."""
    out = []
    for r, j in zip(rows, cols):
        order = np.argsort(-x[r], kind="stable")
        out.append(int(np.flatnonzero(order == j)[0]))
    return np.array(out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_positions_match_stable_argsort_with_ties(dtype, binning):
    # Integer-valued scores: most items tie with others, correct items with wrong ones and with
    # each other; a row of maxima, a constant row, infinities and a span too small for a scale.
    rng = np.random.default_rng(7)
    x = rng.integers(-6, 7, size=(9, 150)).astype(dtype)
    x[1] = 3.0  # constant row
    x[2, :5] = x[2].max()  # several maxima, the correct items among them below
    x[3, 10] = np.inf
    x[4, ::7] = -np.inf
    x[5] = 0.0
    x[5, [3, 30]] = np.finfo(dtype).smallest_subnormal  # span 1 subnormal: bins cannot scale it
    x[6, ::2] = -0.0  # -0.0 ties with +0.0
    rows = np.repeat(np.arange(9), 6)
    cols = np.sort(rng.choice(150, size=(9, 6), replace=False), axis=1).ravel()
    cols[6:12] = [0, 1, 2, 3, 4, 60]  # row 2: correct items at the tied maximum and one below
    cols[30:36] = [2, 3, 30, 40, 50, 60]  # row 5: the subnormals and zeros
    got = chunk_positions(x, x.max(axis=1), rows, cols)
    assert np.array_equal(got, stable_positions(x, rows, cols))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    q=st.integers(1, 12), g=st.integers(1, 40), n_ids=st.integers(1, 6), levels=st.integers(1, 8),
    chunk=st.integers(1, 13), seed=st.integers(0, 2**16),
)
def test_fuzz_exact_against_numpy_full_sort(q, g, n_ids, levels, chunk, seed):
    # Few distinct integer scores: ties everywhere. The figures must be bit-identical.
    rng = np.random.default_rng(seed)
    gids = rng.integers(0, n_ids, g)
    qids = gids[rng.integers(0, g, q)]
    sim = rng.integers(0, levels, size=(q, g)).astype(np.float32) + 2.0 * (qids[:, None] == gids[None, :])
    assert retrieval_metrics(sim, qids, gids, chunk_size=chunk) == numpy_full_sort_metrics(sim, qids, gids)


def test_bit_identical_to_numpy_full_sort():
    # Gaussian scores, ~20 correct items per query shifted by two standard deviations (the
    # benchmark's hard case), quantised so that ties occur; and the transposed (i2t) matrix.
    rng = np.random.default_rng(3)
    gids = rng.permutation(400) % 20
    qids = gids[rng.integers(0, 400, 150)]
    sim = rng.standard_normal((150, 400)).astype(np.float32) + 2.0 * (qids[:, None] == gids[None, :])
    sim = np.round(sim * 64) / 64
    assert retrieval_metrics(sim, qids, gids, chunk_size=16) == numpy_full_sort_metrics(sim, qids, gids)
    assert retrieval_metrics(sim.T, gids, qids[:150], skip_missing=True, chunk_size=5) == {
        **numpy_full_sort_metrics(sim.T[np.isin(gids, qids)], gids[np.isin(gids, qids)], qids),
        "num_skipped": int((~np.isin(gids, qids)).sum()),
    }


def test_threads_give_the_same_figures_and_errors():
    sim, qids, gids = random_case(70, 90, 7, seed=4, quantum=0.1)
    one = retrieval_metrics(sim, qids, gids, chunk_size=6, threads=1)
    assert retrieval_metrics(sim, qids, gids, chunk_size=6, threads=3) == one
    assert_close(one, naive_retrieval_metrics(sim, qids, gids))
    before = torch.get_num_threads()
    bad = sim.clone()
    bad[[40, 13], 5] = float("nan")  # the first bad row is named, whichever thread meets it first
    with pytest.raises(MetricsError, match="query row 13"):
        retrieval_metrics(bad, qids, gids, chunk_size=6, threads=3)
    assert torch.get_num_threads() == before  # restored after the threaded section
