"""Retrieval (rag.py, chunking.py): files cut by their structure, learned incrementally into the store,
found by BM25; turns that answer from them with their sources; the magic. Real files, real SQLite,
the real default model."""

import json
import os
import time
from pathlib import Path

import pytest

from offgrid_jupyter.retrieval.chunking import chunk
from offgrid_jupyter.errors import CollectionNotFoundError, PathRefusedError
from offgrid_jupyter.retrieval.paths import inside
from offgrid_jupyter.retrieval.rag import fts_query
from offgrid_jupyter.chat.turns import ChatTurn

from .conftest import GREEDY, one_line_error

PROJECTS = {  # a generated corpus with known answers: one fact per file, each in its own words
    "zorbit": ("capacitor", "The Zorbit board uses a tantalum capacitor rated at 47 microfarads."),
    "quillon": ("database", "Quillon stores its measurements in a PostgreSQL database called tidepool."),
    "marrow": ("deadline", "The Marrow survey closes its fieldwork on the ninth of March."),
    "vesper": ("telescope", "Vesper observes with a refracting telescope of 120 millimetres aperture."),
    "brindle": ("budget", "Brindle's budget for the pilot is eighteen thousand euros."),
    "ostrich": ("language", "The Ostrich pipeline is written in Julia and runs nightly."),
}


def corpus(root: Path) -> Path:
    notes = root / "notes"
    notes.mkdir(parents=True)
    for name, (topic, fact) in PROJECTS.items():
        (notes / f"{name}.md").write_text(
            f"# {name.title()}\n\nGeneral notes about the {name} project.\n\n## {topic.title()}\n\n{fact}\n\n"
            f"## History\n\nThe {name} project started as a side project and grew.\n")
    return notes


# -- chunks follow structure -----------------------------------------------------------------------
def test_chunks_follow_headings_functions_cells_and_tables(tmp_path):
    md = "# Guide\n\nIntro.\n\n## Install\n\nRun pip.\n\n```\n# not a heading\n```\n\n### Linux\n\nUse apt.\n"
    _, pieces = chunk(Path("g.md"), md.encode())
    assert [(p.heading, p.start) for p in pieces] == [("Guide", 1), ("Guide > Install", 5), ("Guide > Install > Linux", 13)]
    assert "not a heading" in pieces[1].text
    py = "import os\n\n\n@cache\ndef fit(x):\n    return x\n\n\nclass Model:\n    pass\n"
    _, pieces = chunk(Path("m.py"), py.encode())
    assert [(p.heading, p.start, p.end) for p in pieces] == [("module", 1, 1), ("def fit", 4, 6), ("class Model", 9, 10)]
    nb = {"cells": [{"cell_type": "markdown", "source": ["# Title"]},
                    {"cell_type": "code", "source": "print(2 + 2)", "outputs": [{"output_type": "stream", "text": "4\n"}]}]}
    kind, pieces = chunk(Path("a.ipynb"), json.dumps(nb).encode())
    assert kind == "notebook" and [(p.unit, p.start) for p in pieces] == [("cell", 1), ("cell", 2)]
    assert "# output:\n4" in pieces[1].text
    kind, [table] = chunk(Path("t.csv"), b"city,population\nLyon,516092\nNantes,320732\n")
    assert kind == "table" and "2 rows" in table.text and "population: int64" in table.text and "Lyon" in table.text
    rst = "Title\n=====\n\nText.\n\nSection\n-------\n\nMore.\n"
    assert [p.heading for p in chunk(Path("r.rst"), rst.encode())[1]] == ["Title", "Title > Section"]
    pdf = minimal_pdf("The reactor coolant is heavy water.")
    kind, pages = chunk(Path("p.pdf"), pdf)
    assert kind == "pdf" and pages[0].unit == "page" and "heavy water" in pages[0].text
    assert fts_query('What is "the" * capacitor OR NEAR(x) 7?') == '"capacitor" OR "near" OR "7"'


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF with one line of text (hand-written: no PDF writer in the test tools)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


# -- learning and finding ------------------------------------------------------------------------------
def test_the_right_file_answers_each_question(store, tmp_path):
    notes = corpus(tmp_path)
    report = store.library.learn([str(notes)], "projects", root=tmp_path)
    assert report.added == len(PROJECTS) and report.failed == [] and report.chunks >= 3 * len(PROJECTS)
    questions = {"zorbit": "How many microfarads is the capacitor?", "quillon": "Which PostgreSQL database holds the "
                 "measurements?", "marrow": "When does the fieldwork close?", "vesper": "What aperture has the "
                 "refracting telescope?", "brindle": "How many euros is the pilot budget?",
                 "ostrich": "Which language is the nightly pipeline written in?"}
    for name, question in questions.items():
        hits = store.library.search(question, "projects", k=3)
        assert hits[0].path == f"notes/{name}.md", (question, [h.path for h in hits])
        assert hits[0].heading.endswith(PROJECTS[name][0].title()) and hits[0].start > 1
    listed = {c["name"]: c for c in store.library.collections()}["projects"]
    assert listed["documents"] == len(PROJECTS) and listed["chunks"] == report.chunks and listed["bytes"] > 0
    stats = store.library.stats()
    assert stats["enabled"] and stats["documents"] == len(PROJECTS) and stats["retrieval"]["searches"] >= 6
    assert stats["index_bytes"] > 0 and stats["retrieval"]["p50_ms"] is not None
    every_page = store.connection().execute(  # what the section reads one b-tree at a time, from a whole scan
        "SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name LIKE 'chunks%'").fetchone()[0]
    assert stats["index_bytes"] == every_page
    with pytest.raises(CollectionNotFoundError, match="known: projects"):
        store.library.search("anything", "nope")


def test_learning_again_is_incremental_and_unreadable_files_are_listed(store, tmp_path):
    notes = corpus(tmp_path)
    (notes / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (notes / "broken.ipynb").write_text("{not json")
    first = store.library.learn([str(notes)], "inc")
    assert first.added == len(PROJECTS) and {f["path"].rsplit("/", 1)[-1] for f in first.failed} == {
        "binary.txt", "broken.ipynb"}
    assert all(f["reason"] for f in first.failed)
    again = store.library.learn([str(notes)], "inc")
    assert (again.added, again.updated, again.unchanged, again.chunks) == (0, 0, len(PROJECTS), 0)
    zorbit = notes / "zorbit.md"
    os.utime(zorbit, (time.time() + 5, time.time() + 5))  # touched, not changed: the hash says so
    assert store.library.learn([str(notes)], "inc").unchanged == len(PROJECTS)
    zorbit.write_text("# Zorbit\n\n## Capacitor\n\nThe Zorbit board now uses a ceramic capacitor of 10 nanofarads.\n")
    (notes / "marrow.md").unlink()
    changed = store.library.learn([str(notes)], "inc")
    assert (changed.updated, changed.removed, changed.unchanged) == (1, 1, len(PROJECTS) - 2)
    assert "nanofarads" in store.library.search("ceramic capacitor nanofarads", "inc")[0].text
    assert all(h.path != "notes/marrow.md" for h in store.library.search("fieldwork March", "inc", k=10))
    store.library.delete("inc")
    assert [c["name"] for c in store.library.collections()] == []


def test_a_root_refuses_paths_that_leave_it(tmp_path):
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    (root / "inside" / "a.md").write_text("# A\n\nfine")
    outside = tmp_path / "secret.md"
    outside.write_text("# Secret\n\nkeys")
    (root / "link.md").symlink_to(outside)
    (root / "inside" / "alias.md").symlink_to(root / "inside" / "a.md")
    assert inside(root, "inside/a.md") == (root / "inside" / "a.md").resolve()
    assert inside(root, "inside/alias.md") == (root / "inside" / "a.md").resolve()  # a link that stays inside
    for bad, rule in (("../secret.md", "'..'"), (str(outside), "outside"), ("link.md", "symbolic link")):
        with pytest.raises(PathRefusedError, match=rule) as err:
            inside(root, bad)
        assert err.value.status == 403


def test_a_turn_answers_from_the_files_and_keeps_its_sources(engine, store, tmp_path):
    corpus(tmp_path)
    store.library.learn([str(tmp_path / "notes")], "projects", root=tmp_path)
    store.create("ask")
    outcome = ChatTurn(engine, store, "ask", "How many microfarads is the Zorbit capacitor?", source="api",
                       params={**GREEDY, "max_tokens": 40}, rag={"collection": "projects", "k": 3}).start().finish()
    sources = outcome.reply.metadata["sources"]
    assert sources[0]["path"] == "notes/zorbit.md" and set(sources[0]) >= {"path", "start", "end", "score",
                                                                           "chunk_id", "collection"}
    assert outcome.provenance()["sources"] == sources and outcome.result.usage["prompt_tokens"] > 60
    stored = store.get("ask").messages
    assert stored[0].content == "How many microfarads is the Zorbit capacitor?"  # the question as asked
    store.export(tmp_path / "out", ["ask"])
    store.delete("ask")
    [back] = store.import_(tmp_path / "out")
    assert store.get(back.id).messages[1].metadata["sources"] == sources


def test_the_magic_learns_searches_and_answers_with_sources(make_shell, tmp_path, monkeypatch):
    corpus(tmp_path)
    monkeypatch.chdir(tmp_path)  # a kernel's working directory: the notebook's folder
    sh = make_shell()
    result, cap = sh.run("%offgrid learn notes --collection projects")
    assert result.success and "6 added" in result.result.text, cap.stdout + cap.stderr
    frame = sh.run("%offgrid learn --list")[0].result
    assert list(frame["collection"]) == ["projects"] and int(frame["documents"][0]) == 6
    hits = sh.run("%offgrid search Which language is the nightly pipeline written in -k 2")[0].result
    assert list(hits["path"])[0] == "notes/ostrich.md"
    assert len(sh.run("%offgrid search project history -k 2")[0].result) == 2
    result, cap = sh.run("%%offgrid -s asked -t 0 --seed 1 -n 40 --rag projects -k 3\nWhen does the Marrow fieldwork close?")
    assert result.success, cap.stdout + cap.stderr
    shown = cap.outputs[-1].data["text/markdown"]
    assert "**Sources**" in shown and "[notes/marrow.md](notes/marrow.md)" in shown
    assert cap.outputs[-1].metadata["offgrid"]["sources"][0]["path"] == "notes/marrow.md"
    one_line_error(*sh.run("%%offgrid --rag nope\nHi"), "No collection 'nope'")
    one_line_error(*sh.run("%%offgrid -k 3\nHi"), "--rag")
    assert sh.run("%offgrid learn --delete projects")[0].success
    assert sh.store.library.collections() == []
