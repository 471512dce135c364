import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from offgrid_jupyter.errors import (
    ContentTooLargeError,
    DuplicateNameError,
    InvalidNameError,
    InvalidRequestError,
    MessageNotFoundError,
    SessionNotFoundError,
    StoreError,
)
from offgrid_jupyter.chat.store import SESSION_ID_RE, Store, data_dir

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    """An injected clock: tests move time instead of sleeping."""

    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cstore(tmp_path, clock):
    return Store(tmp_path / "db.sqlite3", clock=clock)


MIGRATED = ["m001_initial", "m002_busy_sessions", "m003_notebook_sessions", "m004_requests", "m005_turn_marks",
            "m006_profiles", "m007_library", "m008_vectors", "m009_completions",
            "m010_latency_histogram"]


def test_database_is_wal_with_recorded_migrations(store):
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.migrations() == MIGRATED
    Store(store.path)  # reopening applies nothing twice
    assert store.migrations() == MIGRATED


def test_data_dir_honours_offgrid_home(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFGRID_HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home"
    assert Store().path == tmp_path / "home" / "offgrid.sqlite3"


def test_create_get_by_id_and_name(store):
    store.profiles.define({"notebook": {}})  # a session's profile must exist (see test_profiles.py)
    s = store.create("analysis", system_prompt="Be terse.", profile="notebook", model="m", metadata={"k": 1})
    assert SESSION_ID_RE.match(s.id)
    assert s.messages == [] and s.message_count == 0 and not s.ended and s.title is None
    assert store.get("analysis").id == s.id == store.get(s.id).id
    assert store.get(s.id).system_prompt == "Be terse." and store.get(s.id).metadata == {"k": 1}


def test_messages_title_and_roles(store):
    s = store.create()
    long_q = "How do I compute a rolling mean over a pandas DataFrame with a datetime index?"
    m1 = store.add_message(s.id, "user", long_q)
    m2 = store.add_message(s.id, "assistant", "Use df.rolling('7D').mean().", usage={"completion_tokens": 9},
                           finish_reason="stop")
    got = store.get(s.id)
    assert [m.id for m in got.messages] == [m1.id, m2.id]
    assert m1.id.startswith("msg-") and len(m1.id) == 16
    assert got.title == long_q[:50] + "…" and len(got.title) == 51
    assert got.messages[1].usage == {"completion_tokens": 9} and got.messages[1].finish_reason == "stop"
    assert got.message_count == 2
    store.add_message(s.id, "user", "short")
    assert store.get(s.id).title == long_q[:50] + "…"  # set once, from the first user message


def test_list_is_newest_first_with_counts_and_no_messages(cstore, clock):
    ids = []
    for i in range(5):
        s = cstore.create(f"s{i}")
        cstore.add_message(s.id, "user", f"q{i}")
        ids.append(s.id)
        clock.advance(1)
    listed = cstore.list(limit=3)
    assert [s.id for s in listed] == ids[::-1][:3]
    assert all(s.messages is None and s.message_count == 1 for s in listed)
    assert [s.id for s in cstore.list(limit=3, offset=3)] == ids[::-1][3:]
    with pytest.raises(InvalidRequestError):
        cstore.list(limit=0)


def test_delete_rename_end(store):
    s = store.create("old")
    store.add_message(s.id, "user", "hi")
    assert store.rename("old", "new").name == "new"
    with pytest.raises(SessionNotFoundError):
        store.get("old")
    store.create("taken")
    with pytest.raises(DuplicateNameError, match="taken"):
        store.rename("new", "taken")
    assert store.end("new").ended
    store.delete("new")
    with pytest.raises(SessionNotFoundError, match=s.id):
        store.get(s.id)
    assert store.connection().execute("SELECT count(*) FROM messages WHERE session_id = ?", (s.id,)).fetchone()[0] == 0


def test_fork_copies_messages_up_to_one(store):
    s = store.create("base")
    a = store.add_message(s.id, "user", "one")
    b = store.add_message(s.id, "assistant", "two")
    store.add_message(s.id, "user", "three")
    fork = store.fork("base", b.id, name="branch")
    assert [m.content for m in fork.messages] == ["one", "two"]
    assert fork.metadata["forked_from"] == s.id and fork.id != s.id
    assert {m.id for m in fork.messages}.isdisjoint({a.id, b.id})
    assert len(store.fork("base").messages) == 3
    with pytest.raises(MessageNotFoundError):
        store.fork("base", "msg-000000000000")


def test_replace_and_delete_turns(store):
    s = store.create()
    store.add_message(s.id, "user", "q1")
    store.add_message(s.id, "assistant", "a1")
    store.add_message(s.id, "user", "q2")
    store.add_message(s.id, "assistant", "a2")
    new = store.replace_last_turn(s.id, "q2 again")
    assert [m.content for m in store.get(s.id).messages] == ["q1", "a1", "q2 again"]
    store.add_message(s.id, "assistant", "a2'")
    first_user = store.get(s.id).messages[0]
    assert store.delete_turn(s.id, first_user.id) == 2
    assert [m.content for m in store.get(s.id).messages] == ["q2 again", "a2'"]
    assert store.get(s.id).message_count == 2 and new.role == "user"


def test_a_cells_turn_is_found_and_replaced_in_execution_order(store):
    s = store.create()
    q1 = store.add_message(s.id, "user", "q1", metadata={"cell_id": "cell-a"})
    store.add_message(s.id, "assistant", "a1")
    store.add_message(s.id, "user", "q2", metadata={"cell_id": "cell-b"})
    store.add_message(s.id, "assistant", "a2")
    assert store.cell_turn(s.id, "cell-a") == q1.id
    assert store.cell_turn(s.id, "cell-z") is None
    again = store.replace_last_turn(s.id, "q1 again", message_id=q1.id, metadata={"cell_id": "cell-a"})
    assert [m.content for m in store.get(s.id).messages] == ["q2", "a2", "q1 again"]
    assert store.cell_turn(s.id, "cell-a") == again.id
    assert store.get(s.id).message_count == 3


def test_notebooks_remember_their_session_until_it_is_deleted(store):
    assert store.notebook_session("/nb/a.ipynb") is None
    s, t = store.create("first"), store.create("second")
    store.bind_notebook("/nb/a.ipynb", s.id)
    assert store.notebook_session("/nb/a.ipynb").id == s.id
    store.bind_notebook("/nb/a.ipynb", "second")
    assert store.notebook_session("/nb/a.ipynb").id == t.id
    store.delete("second")
    assert store.notebook_session("/nb/a.ipynb") is None
    with pytest.raises(SessionNotFoundError):
        store.bind_notebook("/nb/a.ipynb", "missing")


def test_invalid_input_gives_distinct_errors(store):
    s = store.create()
    for bad in ("", "-x", "has space", "a" * 65, "../etc", "session-0123456789ab"):
        with pytest.raises(InvalidNameError):
            store.create(bad)
    with pytest.raises(InvalidRequestError, match="role"):
        store.add_message(s.id, "wizard", "hi")
    with pytest.raises(InvalidRequestError, match="non-empty"):
        store.add_message(s.id, "user", "   ")
    with pytest.raises(ContentTooLargeError, match="limit"):
        store.add_message(s.id, "user", "x" * (1024 * 1024 + 1))
    with pytest.raises(SessionNotFoundError):
        store.add_message("no-such-session", "user", "hi")
    assert {InvalidNameError.status, SessionNotFoundError.status, DuplicateNameError.status,
            ContentTooLargeError.status} == {400, 404, 409, 413}


def test_corrupt_database_is_reported_and_never_wiped(tmp_path):
    db = tmp_path / "offgrid.sqlite3"
    junk = b"this is not a database" * 100
    db.write_bytes(junk)
    with pytest.raises(StoreError, match=str(db)):
        Store(db)
    assert db.read_bytes() == junk


def test_restart_continues_the_conversation(tmp_path):
    first = Store(tmp_path / "db.sqlite3")
    s = first.create("nb")
    first.add_message("nb", "user", "remember 42")
    first.close()
    again = Store(tmp_path / "db.sqlite3")  # a new process would do exactly this
    assert [m.content for m in again.get("nb").messages] == ["remember 42"]
    assert again.get("nb").id == s.id


def test_another_writer_is_seen_through_the_cache(tmp_path):
    a, b = Store(tmp_path / "db.sqlite3"), Store(tmp_path / "db.sqlite3")
    s = a.create()
    a.add_message(s.id, "user", "from a")
    assert len(a.get(s.id).messages) == 1  # now cached in a
    b.add_message(s.id, "assistant", "from b")
    assert [m.content for m in a.get(s.id).messages] == ["from a", "from b"]


def test_sliding_ttl_with_injected_clock(cstore, clock):
    s = cstore.create()
    cstore.add_message(s.id, "user", "hi")
    cstore.get(s.id)
    assert s.id in cstore.cached_ids() and cstore.is_active(s.id)
    assert cstore.ttl_remaining(s.id) == pytest.approx(10 * 3600)
    clock.advance(9 * 3600)
    assert cstore.is_active(s.id) and cstore.ttl_remaining(s.id) == pytest.approx(3600)
    cstore.touch(s.id)  # sliding: an access resets the window
    clock.advance(9 * 3600)
    assert cstore.is_active(s.id)
    clock.advance(2 * 3600)
    assert not cstore.is_active(s.id) and cstore.ttl_remaining(s.id) == 0
    assert s.id not in cstore.cached_ids()
    assert [m.content for m in cstore.get(s.id).messages] == ["hi"]  # read back transparently
    assert cstore.is_active(s.id)  # get() counts as an access
    cstore.end(s.id)
    assert not cstore.is_active(s.id)
    resumed = cstore.resume(s.id, context={"step": 3})
    assert not resumed.ended and resumed.metadata["context"] == {"step": 3} and cstore.is_active(s.id)


def test_session_stats(cstore, clock):
    a, b, c = cstore.create(), cstore.create(), cstore.create()
    for s in (a, b, c):
        cstore.add_message(s.id, "user", "hi")
    clock.advance(3600)
    cstore.touch(a.id)
    clock.advance(11 * 3600)
    cstore.touch(b.id)
    cstore.end(c.id)
    st = cstore.session_stats()
    assert st["total_sessions"] == 3 and st["ended_sessions"] == 1
    assert st["active_sessions"] == 1 and st["idle_expired_sessions"] == 1
    assert st["longest_idle_time_hours"] == pytest.approx(11) and st["shortest_idle_time_hours"] == 0
    assert st["avg_idle_time_hours"] == pytest.approx(5.5) and st["ttl_hours"] == 10


def test_pruning_empty_sessions_spares_busy_ones(tmp_path, clock):
    busy_in_engine = set()
    st = Store(tmp_path / "db.sqlite3", clock=clock, busy_sessions=lambda: busy_in_engine)
    empty, kept, queued, marked = st.create(), st.create(), st.create(), st.create()
    st.add_message(kept.id, "user", "hi")
    busy_in_engine.add(queued.id)
    clock.advance(30)
    assert st.prune() == 0  # younger than 60 s
    clock.advance(31)
    with st.busy(marked.id):
        assert len(st.list()) == 4  # reading never prunes
        assert st.prune() == 1  # only `empty` goes
    assert not st.exists(empty.id) and st.exists(queued.id) and st.exists(marked.id)
    busy_in_engine.clear()
    assert st.prune() == 2


def test_busy_mark_of_a_dead_process_does_not_protect(tmp_path, clock):
    st = Store(tmp_path / "db.sqlite3", clock=clock)
    s = st.create()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    st.transaction(lambda c: c.execute("INSERT INTO busy (token, session_id, pid, since) VALUES ('t', ?, ?, 0)",
                               (s.id, int(dead.stdout))))
    clock.advance(120)
    assert st.prune() == 1


def test_retention_only_when_configured(tmp_path, clock):
    st = Store(tmp_path / "db.sqlite3", clock=clock)
    s = st.create()
    st.add_message(s.id, "user", "hi")
    clock.advance(400 * 86400)
    assert st.prune() == 0 and st.exists(s.id)
    assert Store(tmp_path / "db.sqlite3", clock=clock, retention_days=30).exists(s.id) is False


def test_export_import_round_trip(tmp_path, store):
    s = store.create("exp", system_prompt="sys")
    store.add_message(s.id, "user", "q", metadata={"cell": 1})
    store.add_message(s.id, "assistant", "a", usage={"prompt_tokens": 3}, finish_reason="stop")
    (path,) = store.export(tmp_path / "out", ["exp"])
    assert path == (tmp_path / "out" / f"{s.id}.json").resolve()
    doc = json.loads(path.read_text())
    assert {"id", "profile_name", "created_at", "updated_at", "title", "messages"} <= set(doc)
    assert set(doc["messages"][0]) >= {"id", "role", "content", "timestamp", "tool_calls", "tool_results"}
    assert isinstance(doc["created_at"], float) and isinstance(doc["messages"][0]["timestamp"], float)

    other = Store(tmp_path / "other.sqlite3")
    (imported,) = other.import_(path)
    again = other.import_(tmp_path / "out")  # idempotent
    assert again[0].message_count == 2
    assert [m.to_dict() for m in imported.messages] == [m.to_dict() for m in store.get(s.id).messages]
    assert imported.name == "exp" and imported.system_prompt == "sys"

    clash = Store(tmp_path / "clash.sqlite3")
    clash.create("exp")
    with pytest.raises(DuplicateNameError, match="exp"):
        clash.import_(path)


def test_export_all_writes_ids_not_names(tmp_path, store):
    for name in ("a", "b"):
        store.add_message(store.create(name).id, "user", "hi")
    paths = store.export(tmp_path / "all")
    assert len(paths) == 2 and all(SESSION_ID_RE.match(p.stem) for p in paths)
    assert all(p.parent == (tmp_path / "all").resolve() for p in paths)


def test_import_rejects_malformed_files(tmp_path, store):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidRequestError, match="bad.json"):
        store.import_(bad)
    bad.write_text(json.dumps({"id": "../../etc/passwd", "messages": []}))
    with pytest.raises(InvalidRequestError, match="id"):
        store.import_(bad)


def test_dataframes_are_typed(store):
    s = store.create("df")
    store.add_message(s.id, "user", "q")
    store.add_message(s.id, "assistant", "a", usage={"prompt_tokens": 5, "completion_tokens": 7})
    sessions = store.sessions_frame()
    assert str(sessions["created_at"].dtype) == "datetime64[ns, UTC]"
    assert sessions["message_count"].dtype == "int64" and sessions["ended"].dtype == bool
    msgs = store.messages_frame("df")
    assert isinstance(msgs["role"].dtype, pd.CategoricalDtype)
    assert str(msgs["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert msgs["completion_tokens"].tolist() == [0, 7] and msgs["prompt_tokens"].dtype == "int64"


def _spawn(db, session, n, tag):
    return subprocess.Popen([sys.executable, "-m", "tests.store_worker", str(db), session, str(n), tag],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_processes_lose_nothing(tmp_path, writers):
    db = tmp_path / "db.sqlite3"
    s = Store(db).create("shared")
    procs = [_spawn(db, s.id, 40, f"w{i}") for i in range(writers)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    msgs = Store(db).get(s.id).messages
    assert len(msgs) == writers * 40 == Store(db).get(s.id).message_count
    for i in range(writers):
        mine = [m.metadata["i"] for m in msgs if m.metadata["tag"] == f"w{i}"]
        assert mine == list(range(40))  # each writer's order kept, nothing lost or doubled


def test_writer_killed_mid_write_leaves_a_consistent_database(tmp_path):
    db = tmp_path / "db.sqlite3"
    s = Store(db).create("victim")
    proc = _spawn(db, s.id, 100000, "k")
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    reopened = Store(db)
    msgs = reopened.get(s.id).messages
    assert len(msgs) >= 1 and len(msgs) == reopened.get(s.id).message_count
    assert all(m.content == f"k:{m.metadata['i']}:" + "x" * 20000 for m in msgs)  # no partial message
    reopened.add_message(s.id, "user", "still writable")


# -- hostile input: the store refuses what it could not keep or read back ----------------------
@pytest.mark.parametrize("name", ["abc\n", "abc\r\n", "\nabc", "a b", "ab\x00c", "é", "a" * 65, "", "-abc",
                                  "session-0123456789ab", "x\ud800"])
def test_names_are_matched_whole(store, name):
    with pytest.raises(InvalidNameError):
        store.create(name)
    assert store.count() == 0


def test_lone_surrogates_are_refused_everywhere_and_nothing_is_stored(store):
    s = store.create("ok")
    bad = "before \ud800 after"
    for call in (lambda: store.create(None, system_prompt=bad), lambda: store.create(None, profile=bad),
                 lambda: store.create(None, metadata={"k": bad}), lambda: store.create(None, metadata={bad: 1}),
                 lambda: store.add_message(s.id, "user", bad),
                 lambda: store.add_message(s.id, "user", "fine", metadata={"deep": [bad]}),
                 lambda: store.update(s.id, system_prompt=bad), lambda: store.begin_turn(s.id, bad)):
        with pytest.raises(InvalidRequestError, match="lone surrogate"):
            call()
    assert store.count() == 1 and store.get(s.id).messages == []


def _nested(depth):
    value = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


def test_nesting_is_bounded_on_the_way_in(store):
    s = store.create("n", metadata=_nested(32))  # 32 objects inside each other: the limit
    with pytest.raises(InvalidRequestError, match="the limit is 32"):
        store.create("too-deep", metadata=_nested(33))
    with pytest.raises(InvalidRequestError, match="the limit is 32"):
        store.add_message(s.id, "user", "hi", metadata={"a": [[[_nested(40)]]]})
    with pytest.raises(InvalidRequestError, match="not a JSON number"):
        store.create("nan", metadata={"x": float("nan")})
    assert [x.name for x in store.list()] == ["n"]


def test_a_session_stored_by_an_older_version_with_deep_json_still_reads_and_lists(store):
    s = store.create("legacy")
    store.add_message(s.id, "user", "hello")
    deep = "[" * 5000 + "]" * 5000  # what the first wave let through: json.loads cannot read it back
    store.transaction(lambda c: c.execute("UPDATE sessions SET metadata = ?, version = version + 1 WHERE id = ?",
                                          (deep, s.id)))
    fresh = Store(store.path)
    assert fresh.list()[0].metadata == {"unreadable": "unreadable: nested too deeply or not JSON"}
    session = fresh.get("legacy")
    assert session.messages[0].content == "hello" and "unreadable" in session.metadata
    assert len(fresh.sessions_frame()) == 1 and json.dumps(session.to_dict())


def test_reading_has_no_side_effects(cstore, clock):
    empty = cstore.create()
    clock.advance(120)
    assert [s.id for s in cstore.list()] == [empty.id]  # listing never prunes
    assert cstore.exists(empty.id)
    cstore.create("next")  # creating does: sessions left empty go first
    assert not cstore.exists(empty.id)


# -- a turn in flight, and what a crash leaves ------------------------------------------------
def test_a_turn_stores_its_question_and_mark_then_its_reply_atomically(store):
    s = store.create("t")
    question, mark = store.begin_turn(s.id, "Why?", metadata={"cell_id": "c"})
    assert store.transaction(lambda c: c.execute("SELECT message_id FROM busy").fetchall())[0][0] == question.id
    reply = store.end_turn(mark, s.id, "Because.", finish_reason="stop", usage={"completion_tokens": 2})
    assert [m.role for m in store.messages(s.id)] == ["user", "assistant"] and reply.finish_reason == "stop"
    assert store.transaction(lambda c: c.execute("SELECT count(*) FROM busy").fetchone()[0]) == 0
    q2, mark2 = store.begin_turn(s.id, "And?")
    store.abandon_turn(mark2, s.id, q2.id)  # failed before any text: the question goes again
    assert [m.content for m in store.messages(s.id)] == ["Why?", "Because."]
    q3, mark3 = store.begin_turn(s.id, "Once more", replace=question.id)  # a re-run cell's turn replaces it
    store.end_turn(mark3, s.id, None)
    assert [m.content for m in store.messages(s.id)] == ["Once more"]
    _, mark4 = store.begin_turn(s.id, "Deleted meanwhile?")
    store.delete(s.id)
    with pytest.raises(SessionNotFoundError, match="deleted while the reply"):
        store.end_turn(mark4, s.id, "lost")
    assert store.transaction(lambda c: c.execute("SELECT count(*) FROM busy").fetchone()[0]) == 0


def test_a_killed_process_s_unanswered_question_is_repaired_on_open(tmp_path):
    db = tmp_path / "db.sqlite3"
    store = Store(db)
    s = store.create("crash")
    store.add_message(s.id, "user", "First question.")
    store.add_message(s.id, "assistant", "First answer.")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from offgrid_jupyter.chat.store import Store; "
         "Store(sys.argv[1]).begin_turn('crash', 'Asked, then killed.'); print('ready', flush=True); time.sleep(60)",
         str(db)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    alive = Store(db)  # the asker is alive: its turn is left alone
    assert not alive.get(s.id).messages[-1].interrupted
    proc.kill()
    proc.wait(timeout=30)
    reopened = Store(db)  # opening repairs: the question stays visible, marked, and out of the prompt
    msgs = reopened.get(s.id).messages
    assert [m.content for m in msgs][-1] == "Asked, then killed." and msgs[-1].interrupted
    assert [m["content"] for m in reopened.get(s.id).chat_messages()] == ["First question.", "First answer."]
    assert reopened.transaction(lambda c: c.execute("SELECT count(*) FROM busy").fetchone()[0]) == 0
    question, mark = reopened.begin_turn(s.id, "Next question.")  # later turns stack nothing on it
    reopened.end_turn(mark, s.id, "Next answer.")
    roles = [m["role"] for m in reopened.get(s.id).chat_messages()]
    assert roles == ["user", "assistant", "user", "assistant"]


def test_a_reused_pid_does_not_keep_a_dead_turn_alive(store):
    s = store.create("pid")
    question, _ = store.begin_turn(s.id, "Whose?")
    # the mark claims this very pid, but a process started at another time: a reused pid
    store.transaction(lambda c: c.execute("UPDATE busy SET pid_started = pid_started - 1000"))
    assert store.repair() == 1 and store.get(s.id).messages[-1].interrupted


def test_a_notebook_is_known_by_its_path_relative_to_the_servers_root_whoever_names_it(tmp_path):
    root = tmp_path / "root"
    (root / "work").mkdir(parents=True)
    db = tmp_path / "db.sqlite3"
    plain = Store(db)  # (a process that does not know the root: as before, the path as given)
    legacy = plain.create("legacy")
    plain.bind_notebook(str(root / "work" / "Old analysis.ipynb"), legacy.id)  # written before paths were relative
    plain.close()
    store = Store(db, notebook_root=root)  # the server, or a kernel it started (OFFGRID_ROOT)
    s = store.create("sales")
    store.bind_notebook(str(root / "work" / "Sales analysis.ipynb"), s.id)  # a kernel knows the absolute path
    assert store.notebook_session("work/Sales analysis.ipynb").id == s.id  # the sidebar asks the relative one
    assert store.notebook_session(str(root / "work" / "Sales analysis.ipynb")).id == s.id
    assert store.notebook_session("work/Old analysis.ipynb").id == legacy.id  # relinked when the store opened
    rows = store.connection().execute("SELECT notebook FROM notebook_sessions ORDER BY notebook").fetchall()
    assert [r[0] for r in rows] == ["work/Old analysis.ipynb", "work/Sales analysis.ipynb"]
    outside = str(tmp_path / "elsewhere.ipynb")
    store.bind_notebook(outside, s.id)
    assert store.notebook_session(outside).id == s.id  # outside the root: kept as it is


def test_titles_are_plain_text():
    from offgrid_jupyter.chat.records import make_title

    assert make_title("Why does `df.groupby` fail?") == "Why does df.groupby fail?"
    assert make_title("## **Plot** the [sales](data/sales.csv)\nplease") == "Plot the sales please"
