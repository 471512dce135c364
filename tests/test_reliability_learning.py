"""The reliability suite, round two: files inside the server's root that tried to stall, bloat or
crash it while it learned them, and names that must not leak from outside the root.

Each file is read by a reader process (offgrid_jupyter/reader.py): a file past a limit is one
entry of the learn's ``failed`` with its reason, and the learn goes on; the server's other routes
answer throughout. One real `jupyter server` on loopback serves the module.
"""

import io
import json
import os
import sqlite3
import threading
import zlib
from pathlib import Path

import httpx
import pytest

from offgrid_jupyter.retrieval.chunking import MAX, Limits, chunk
from offgrid_jupyter.chat.profiles import check_profile
from offgrid_jupyter.chat.store import Store

from .kernels import AUTH, jupyter_server

LIMITS = '--OffgridApp.learn_limits={"seconds_per_file": 15, "memory_mb": 768, "max_entries": 20000}'


def deflate_bomb_pdf(megabytes: int) -> bytes:
    """A one-page PDF whose content stream inflates to *megabytes* of text operators (~0.1% of that on disk)."""
    packer = zlib.compressobj(9)
    block = b"A" * (1 << 20)
    content = packer.compress(b"BT /F1 12 Tf (") + b"".join(packer.compress(block) for _ in range(megabytes))
    content += packer.compress(b") Tj ET") + packer.flush()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(content) + content + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = io.BytesIO(), []
    out.write(b"%PDF-1.4\n")
    for n, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % n + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("learning")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (outside / "secret.md").write_text("# Secret\n\nThe launch code is 0000.\n")
    hostile = root / "hostile"
    hostile.mkdir()
    (hostile / "heading.md").write_text(("#" + " " * 3200 + "a\n") * 20 + "# Real heading\n\nSome text.\n")
    (hostile / "deep.ipynb").write_text('{"cells": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (hostile / "terms.py").write_text("x = " + "1+" * 200_000 + "1\n")
    (hostile / "dashes.py").write_text(("-" * 50_000 + "\n") * 20)
    (hostile / "wide.csv").write_text(",".join(f"c{i}" for i in range(200_000)) + "\n" + "1," * 199_999 + "1\n")
    (hostile / "oneline.txt").write_text("word " * 3_000_000)  # 15 MB, one line
    (hostile / "bomb.pdf").write_bytes(deflate_bomb_pdf(264))
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"z": np.zeros(12_000_000, dtype=np.int64)}), hostile / "zeros.parquet",
                   compression="zstd")
    (hostile / "fine.md").write_text("# Harbour\n\nThe harbour master keeps the tide tables.\n")
    os.mkfifo(hostile / "pipe.md")
    loops = root / "loops"
    (loops / "a").mkdir(parents=True)
    (loops / "a" / "note.md").write_text("# Loop note\n\nFound once.\n")
    os.symlink("../..", loops / "a" / "up")  # links to ancestors: a walk that follows them never ends
    os.symlink("..", loops / "back")
    os.symlink(outside, root / "link")
    return {"root": root, "outside": outside}


@pytest.fixture(scope="module")
def server(files):
    with jupyter_server(files["root"], "--OffgridApp.n_ctx=1024", LIMITS) as srv:
        yield srv


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server["url"] + "offgrid/v1/", headers=AUTH, timeout=300) as client:
        yield client


def failed_reasons(report):
    return {f["path"]: f["reason"] for f in report["failed"]}


def test_hostile_files_each_fail_alone_and_the_server_answers_throughout(server, api, files):
    outcome = {}

    def learn():
        outcome["r"] = api.post("collections", json={"name": "hostile", "paths": ["hostile"]})

    t = threading.Thread(target=learn)
    t.start()
    answered = 0
    with httpx.Client(base_url=server["url"] + "offgrid/v1/", headers=AUTH, timeout=30) as other:
        while t.is_alive():
            assert other.get("health").status_code == 200
            assert other.get("sessions").status_code == 200
            answered += 1
    t.join()
    assert answered >= 3  # (bench/reliability.py measures how fast; here: that they answered while it ran)
    r = outcome["r"]
    assert r.status_code == 200, r.text[:500]
    report = r.json()
    reasons = failed_reasons(report)
    assert "columns" in reasons["hostile/wide.csv"] and "max_columns" in reasons["hostile/wide.csv"]
    assert "rows" in reasons["hostile/zeros.parquet"]
    assert "deep.ipynb" in " ".join(reasons) and "nested too deeply" in reasons["hostile/deep.ipynb"]
    assert reasons["hostile/bomb.pdf"]  # pypdf's own decompression limit, else the reader's memory or time
    assert "pipe.md" not in " ".join(reasons)  # a FIFO in a folder is skipped, never opened
    learned = {d["path"]: d for d in api.get("collections/hostile").json()["documents"]}
    assert {"hostile/fine.md", "hostile/heading.md", "hostile/oneline.txt", "hostile/terms.py",
            "hostile/dashes.py"} <= set(learned)
    assert report["added"] == len(learned)
    for q in ("harbour tide", "word", "Real heading"):
        hits = api.get("collections/hostile/search", params={"q": q, "k": 50}).json()["hits"]
        assert hits and max(len(h["text"]) for h in hits) <= MAX  # no chunk is larger than MAX
    assert str(files["root"]) not in r.text


def test_a_fifo_named_explicitly_is_refused_with_its_reason(api):
    r = api.post("collections", json={"name": "pipes", "paths": ["hostile/pipe.md"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "nothing_learned"  # every path failed:
    assert "`hostile/pipe.md`: not a regular file" in r.json()["error"]["message"]
    assert api.get("collections/pipes").status_code == 404  # no collection was made


def test_globs_through_links_to_ancestors_end_and_never_name_files_outside_the_root(api, files):
    r = api.post("collections", json={"name": "loops", "paths": ["loops/**/*.md"]})
    assert r.status_code == 200, r.text[:300]
    assert [d["path"] for d in api.get("collections/loops").json()["documents"]] == ["loops/a/note.md"]
    for pattern in ("link/*", "link/**/*.md", "link/*.md", "l*/secret.md", "*/passwd", "**/secret.md"):
        out = api.post("collections", json={"name": "peek", "paths": [pattern]})
        text = out.text.replace(pattern, "")
        assert "passwd" not in text and "secret" not in text and str(files["outside"]) not in text
        if pattern.startswith("link/"):  # its fixed part leads outside: refused, naming only what was given
            assert out.status_code == 403 and "through a symbolic link" in out.json()["error"]["message"]
        else:  # what matched outside is neither learned nor named
            assert out.status_code == 400, out.text[:300]
            assert out.json()["error"]["message"].endswith(f"`{pattern}`: the pattern matches no file.")
    assert api.get("collections/peek").status_code == 404
    named = api.post("collections", json={"name": "peek", "paths": ["link/passwd"]})  # named: refused as outside
    missing = api.post("collections", json={"name": "peek", "paths": ["link/nothing-here"]})
    assert named.status_code == missing.status_code == 403  # the same answer whether it exists or not
    assert str(files["root"]) not in named.text + missing.text


def test_a_file_that_became_unreadable_loses_its_old_chunks(api, files):
    note = files["root"] / "changing.md"
    note.write_text("# Lighthouse\n\nThe keeper polishes the lens.\n")
    assert api.post("collections", json={"name": "changing", "paths": ["changing.md"]}).json()["added"] == 1
    assert api.get("collections/changing/search", params={"q": "keeper lens"}).json()["hits"]
    note.write_bytes(b"\xff\xfe binary now \x00")
    again = api.post("collections", json={"name": "changing", "paths": ["changing.md"]}).json()
    assert "earlier chunks were removed" in failed_reasons(again)["changing.md"]
    assert api.get("collections/changing/search", params={"q": "keeper lens"}).json()["hits"] == []


def test_an_import_naming_an_unknown_profile_is_refused_like_a_new_session(api):
    doc = {"id": "session-0123456789ab", "profile_name": "no-such-profile", "messages": []}
    r = api.post("import", json=doc)
    assert r.status_code == 400 and "no-such-profile" in r.json()["error"]["message"]
    assert api.get("sessions/session-0123456789ab").status_code == 404


def test_a_profile_whose_model_is_a_fifo_or_not_a_model_is_a_400_and_the_loaded_model_stays(server, api, files):
    home = files["root"] / "home"  # (tests/kernels.py: the server's OFFGRID_HOME)
    fifo = files["root"].parent / "model-pipe.gguf"
    os.mkfifo(fifo)
    text = files["root"].parent / "model.gguf"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    store = Store(home / "offgrid.sqlite3")  # the server's database: profiles are kept there
    for name, path in (("piped", fifo), ("texty", text)):
        store.profiles.put(check_profile(name, {"model": str(path)}))
    store.close()
    assert api.post("chat/completions", json={"messages": [{"role": "user", "content": "Hi."}],
                                              "max_tokens": 2}).status_code == 200  # the model is loaded
    for name, needle in (("piped", "not a regular file"), ("texty", "Not a GGUF")):
        session = api.post("sessions", json={"name": f"with-{name}", "profile_name": name}).json()["name"]
        r = api.post(f"sessions/{session}/chat", json={"message": "Hi.", "max_tokens": 4})
        assert r.status_code == 400, r.text[:300]
        message = r.json()["error"]["message"]
        assert needle in message and "root:x" not in message and r.json()["error"]["code"] == "unusable_model"
        assert api.get(f"sessions/{session}").json()["messages"] == []
        assert api.get("sessions").status_code == 200
    assert api.get("health").json()["model_loaded"] is True


def test_chunking_is_linear_and_bounded_whatever_the_shape():
    for name, data in (("h.md", ("#" + " " * 20_000 + "x\n") * 10), ("long.txt", "y" * 1_000_000),
                       ("cell.ipynb", json.dumps({"cells": [{"cell_type": "code", "source": "z" * 100_000}]})),
                       ("deep.py", "(" * 5000 + ")" * 5000)):
        _, pieces = chunk(Path(name), data.encode(), Limits())
        assert pieces and all(len(p.text) <= MAX for p in pieces), name
    with pytest.raises(Exception, match="max_columns"):
        chunk(Path("w.tsv"), ("\t".join("c" * 3000) + "\n").encode(), Limits())
