"""Retrieval with an embedding model (embeddings.py): vectors stored with their chunks, kept in step
when files change, resumed after an interruption, fused with BM25 in searches, and a clear error
or a BM25 fallback when the model is missing. The model is the embedded default GGUF, a generative
model, which llama.cpp embeds by averaging its tokens' hidden states: a weak embedder, so these
tests check behaviour (what is stored, what is searched), not how good its matches are.
"""

import logging
import os
import shutil

import numpy as np
import pytest

from offgrid_jupyter.retrieval import embeddings
from offgrid_jupyter.errors import InvalidModelError, ModelNotFoundError
from offgrid_jupyter.inference.models import resolve_model

from .conftest import one_line_error
from .test_rag import PROJECTS, corpus

QUESTIONS = {"zorbit": "How many microfarads is the capacitor?", "vesper": "What aperture has the refracting "
             "telescope?", "brindle": "How many euros is the pilot budget?"}


@pytest.fixture(scope="module")
def gguf():
    return str(resolve_model().path)


def vectors(store, collection):
    return store.connection().execute("SELECT count(*) FROM chunk_vectors WHERE collection = ?",
                                      (collection,)).fetchone()[0]


def test_fusion_ranks_by_reciprocal_rank_and_breaks_ties_by_id():
    fused = embeddings.fuse([1, 2, 3], [3, 4, 1])
    assert [i for i, _ in fused] == [1, 3, 2, 4]  # 1: 1/61 + 1/63; 3: 1/63 + 1/61 (a tie: lower id first)
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 63) and fused[-1][1] == pytest.approx(1 / 62)
    assert embeddings.fuse([], []) == []


def test_a_collection_learned_with_an_embedding_model_keeps_vectors_and_fuses_them(store, tmp_path, gguf):
    notes = corpus(tmp_path)
    report = store.library.learn([str(notes)], "emb", embedding_model=gguf, root=tmp_path)
    assert report.added == len(PROJECTS) and report.embedded == report.chunks > 0
    listed = {c["name"]: c for c in store.library.collections()}["emb"]
    assert listed["embedding_model"] == gguf and listed["vectors"] == listed["chunks"] == report.chunks
    blob = store.connection().execute("SELECT vector FROM chunk_vectors LIMIT 1").fetchone()[0]
    vec = np.frombuffer(blob, dtype=np.float32)
    assert vec.shape == (embeddings.embedder(gguf).dim,) and np.linalg.norm(vec) == pytest.approx(1, abs=1e-4)
    for name, question in QUESTIONS.items():  # BM25 still carries these: the right file stays near the top
        hits = store.library.search(question, "emb", k=3)
        assert f"notes/{name}.md" in [h.path for h in hits], (question, [h.path for h in hits])
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True) and hits[0].score < 1
    # words no file has: BM25 finds nothing, the vectors still rank the collection's chunks
    meaning = store.library.search("qwzx vvyk", "emb", k=4)
    assert len(meaning) == 4 and {h.collection for h in meaning} == {"emb"}
    assert all(h.text for h in meaning)
    plain = store.library.learn([str(notes)], "plain", root=tmp_path)  # no model: BM25 alone, as before
    assert plain.embedded == 0 and store.library.search("qwzx vvyk", "plain") == []
    stats = store.library.stats()
    assert stats["vectors"] == report.chunks and stats["embedding_models"] == [os.path.basename(gguf)]


def test_vectors_follow_changed_files_and_an_interrupted_learn_resumes(store, tmp_path, gguf):
    notes = corpus(tmp_path)
    first = store.library.learn([str(notes)], "inc", embedding_model=gguf, root=tmp_path)
    again = store.library.learn([str(notes)], "inc", root=tmp_path)  # the collection remembers its model
    assert (again.unchanged, again.chunks, again.embedded) == (len(PROJECTS), 0, 0)
    (notes / "zorbit.md").write_text("# Zorbit\n\n## Capacitor\n\nNow a ceramic capacitor of 10 nanofarads.\n")
    (notes / "marrow.md").unlink()
    changed = store.library.learn([str(notes)], "inc", root=tmp_path)
    assert changed.updated == 1 and changed.removed == 1 and changed.embedded == changed.chunks
    listed = {c["name"]: c for c in store.library.collections()}["inc"]
    assert listed["vectors"] == listed["chunks"] < first.chunks  # the old chunks' vectors went with them
    orphans = store.connection().execute("SELECT count(*) FROM chunk_vectors v LEFT JOIN chunks k ON k.id = "
                                         "v.chunk_id WHERE k.id IS NULL").fetchone()[0]
    assert orphans == 0
    # an interruption (kill -9, Ctrl-C) between batches leaves chunks without vectors: the next learn embeds them
    store.transaction(lambda c: c.execute("DELETE FROM chunk_vectors WHERE chunk_id IN (SELECT chunk_id FROM "
                                          "chunk_vectors WHERE collection = 'inc' LIMIT 3)"))
    resumed = store.library.learn([str(notes)], "inc", root=tmp_path)
    assert resumed.embedded == 3 and vectors(store, "inc") == listed["chunks"]
    store.library.delete("inc")
    assert vectors(store, "inc") == 0


def test_another_model_embeds_the_collection_again(store, tmp_path, gguf):
    notes = corpus(tmp_path)
    first = store.library.learn([str(notes)], "swap", embedding_model=gguf, root=tmp_path)
    other = tmp_path / "other.gguf"  # the same weights under another name: another model to the store
    try:
        os.link(gguf, other)
    except OSError:
        shutil.copyfile(gguf, other)
    swapped = store.library.learn([str(notes)], "swap", embedding_model=str(other), root=tmp_path)
    assert swapped.unchanged == len(PROJECTS) and swapped.embedded == first.chunks
    listed = {c["name"]: c for c in store.library.collections()}["swap"]
    assert listed["embedding_model"] == str(other.resolve()) and listed["vectors"] == first.chunks


def test_a_bad_embedding_model_fails_before_learning_and_a_lost_one_falls_back_to_bm25(
        store, tmp_path, gguf, caplog):
    notes = corpus(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not found"):
        store.library.learn([str(notes)], "bad", embedding_model=str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    with pytest.raises(InvalidModelError, match="Not a GGUF"):
        store.library.learn([str(notes)], "bad", embedding_model=str(fake))
    assert store.library.collections() == []  # nothing learned either time
    store.library.learn([str(notes)], "lost", embedding_model=gguf, root=tmp_path)
    store.transaction(lambda c: c.execute("UPDATE collections SET embedding_model = ? WHERE name = 'lost'",
                                          (str(tmp_path / "moved.gguf"),)))
    with caplog.at_level(logging.WARNING, logger="offgrid_jupyter.retrieval.embeddings"):
        hits = store.library.search(QUESTIONS["vesper"], "lost", k=3)
    assert hits[0].path == "notes/vesper.md" and hits[0].score > 1  # BM25's own score: not a fused one
    assert "BM25 alone" in caplog.text and "moved.gguf" in caplog.text


def test_the_magic_learns_with_an_embedding_model(make_shell, tmp_path, monkeypatch, gguf):
    corpus(tmp_path)
    monkeypatch.chdir(tmp_path)
    sh = make_shell()
    result, cap = sh.run(f"%offgrid learn notes --collection vec --embedding-model {gguf}")
    assert result.success and "embedded" in result.result.text, cap.stdout + cap.stderr
    frame = sh.run("%offgrid learn --list")[0].result
    assert list(frame["embedding_model"]) == [os.path.basename(gguf)]
    hits = sh.run("%offgrid search qwzx vvyk -k 2 --collection vec")[0].result
    assert len(hits) == 2
    one_line_error(*sh.run(f"%offgrid learn notes --collection vec2 --embedding-model {tmp_path}/none.gguf"),
                   "Model file not found", "none.gguf")
