"""Session KV snapshots on disk (kvdisk.py): a file is whole or ignored and removed (cut, corrupt,
another model or session), the directory stays within its bound, a deleted session's file goes;
and on the real model, a long session's next turn after a restart reads only its new tokens."""

import ctypes
import os
import time

import numpy as np
import pytest

from offgrid_jupyter.inference import kvdisk
from offgrid_jupyter.inference.engine import Engine
from offgrid_jupyter.inference.kvdisk import KVDisk

from .conftest import GREEDY, user


def _data(n: int, fill: int = 7):
    buf = (ctypes.c_uint8 * n)()
    ctypes.memset(buf, fill, n)
    return buf


def _disk(tmp_path, max_bytes=1 << 30):
    d = KVDisk(tmp_path / "kv", max_bytes)
    d.model = "model-a"
    return d


def test_a_snapshot_comes_back_as_written(tmp_path):
    d = _disk(tmp_path)
    d.save("s1", np.arange(5, dtype=np.intc), _data(100))
    d.flush()
    tokens, data = d.load("s1")
    assert tokens.tolist() == [0, 1, 2, 3, 4] and bytes(data) == bytes([7]) * 100
    assert d.load("other") is None
    assert d.stats()["files"] == 1 and d.stats()["writes"] == 1


@pytest.mark.parametrize("damage", ["cut", "flip", "empty", "other-model", "other-session", "garbage"])
def test_a_damaged_or_foreign_file_is_ignored_and_removed(tmp_path, damage):
    d = _disk(tmp_path)
    d.save("s1", np.arange(50, dtype=np.intc), _data(4000))
    d.flush()
    path = tmp_path / "kv" / kvdisk.file_name("s1")
    raw = path.read_bytes()
    if damage == "cut":
        path.write_bytes(raw[:len(raw) // 2])
    elif damage == "flip":
        path.write_bytes(raw[:300] + bytes([raw[300] ^ 1]) + raw[301:])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    elif damage == "other-model":
        d.model = "model-b"
    else:  # a file copied under another session's name
        os.replace(path, tmp_path / "kv" / kvdisk.file_name("s2"))
        path = tmp_path / "kv" / kvdisk.file_name("s2")
    assert d.load("s2" if damage == "other-session" else "s1") is None
    assert not path.exists()
    assert d.stats()["rejected"] == 1


def test_the_directory_keeps_within_its_bound_least_recently_used_first(tmp_path):
    d = _disk(tmp_path, max_bytes=35_000)  # three files fit, not four
    for i in range(3):
        d.save(f"s{i}", np.arange(10, dtype=np.intc), _data(10_000))
        d.flush()
        past = time.time() - 100 + i  # distinct, ordered modification times
        os.utime(tmp_path / "kv" / kvdisk.file_name(f"s{i}"), (past, past))
    assert d.load("s0") is not None  # used: now the most recent
    d.save("s3", np.arange(10, dtype=np.intc), _data(10_000))
    d.flush()
    assert [d.load(f"s{i}") is not None for i in range(4)] == [True, False, True, True]


def test_names_never_leave_the_directory_and_forget_removes(tmp_path):
    d = _disk(tmp_path)
    for odd in ("../../escape", "/etc/passwd", "a\udcff", "x" * 5000):
        d.save(odd, np.arange(3, dtype=np.intc), _data(10))
    d.flush()
    assert sorted(p.parent for p in tmp_path.rglob("*.kv")) == [tmp_path / "kv"] * 4
    d.forget("../../escape")
    d.save("kept", np.arange(3, dtype=np.intc), _data(10))
    d.flush()
    assert d.load("../../escape") is None and d.load("kept") is not None


def test_a_crashed_writers_leftover_is_swept_at_start(tmp_path):
    folder = tmp_path / "kv"
    folder.mkdir()
    old, new = folder / ".abc.1.2.tmp", folder / ".def.1.3.tmp"
    old.write_bytes(b"partial")
    new.write_bytes(b"being written by another process")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    KVDisk(folder, 1 << 20)
    assert not old.exists() and new.exists()


# -- on the real model ------------------------------------------------------------------------------
HISTORY = []
for _i in range(10):
    HISTORY += [user(f"Note {_i}: the pump at station {_i} ran for {_i * 7 % 13} hours.")[0],
                {"role": "assistant", "content": f"Noted: station {_i}, {_i * 7 % 13} hours."}]


def test_a_sessions_next_turn_after_a_restart_reads_only_its_new_tokens(tmp_path, store):
    folder = tmp_path / "kv"
    first = Engine(n_ctx=2048, n_parallel=2, tune_threads=False, kv_dir=folder)
    reply = first.complete(HISTORY + user("Which station ran longest?"), session_id="long", max_tokens=12, **GREEDY)
    first.close()
    turn = HISTORY + user("Which station ran longest?") + [{"role": "assistant", "content": reply.text}] \
        + user("And the shortest?")
    second = Engine(n_ctx=2048, n_parallel=2, tune_threads=False, kv_dir=folder)
    r = second.complete(turn, session_id="long", max_tokens=12, **GREEDY)
    assert r.usage["cached_tokens"] >= reply.usage["prompt_tokens"]  # the history came from the file
    assert second.stats()["cache"]["disk"]["loads"] == 1
    cold = Engine(n_ctx=2048, n_parallel=2, tune_threads=False)  # no directory: reads it all
    plain = cold.complete(turn, session_id="long", max_tokens=12, **GREEDY)
    cold.close()
    assert plain.usage["cached_tokens"] == 0 and plain.text == r.text  # the same reply either way

    # another model's engine (its fingerprint differs) ignores the file and removes it
    second.close()
    third = Engine(n_ctx=2048, n_parallel=2, tune_threads=False, kv_dir=folder)
    third.complete(user("Hi"), max_tokens=1)
    third.disk.model = "another-model"
    r3 = third.complete(turn, session_id="long", max_tokens=12, **GREEDY)
    assert r3.usage["cached_tokens"] < 64 and r3.text == r.text  # at most the "Hi" turn's system prompt
    assert third.disk.stats()["rejected"] == 1

    # deleting the session removes its file, and the engine does not write it back
    third.disk.model = kvdisk.fingerprint(third.model.path)
    third.complete(turn, session_id="gone", max_tokens=4, **GREEDY)
    third.complete(user("Hi"), max_tokens=1)  # idle in between: the engine handed it to the disk
    third.disk.flush()
    path = folder / kvdisk.file_name("gone")
    assert path.exists()
    third.forget("gone")
    third.close()
    assert not path.exists()


def test_deleting_a_session_in_the_store_removes_its_snapshot(tmp_path):
    from offgrid_jupyter.chat.store import Store

    st = Store(tmp_path / "offgrid.sqlite3")
    session = st.create("doomed")
    calls = []
    st.on_delete.append(calls.append)
    st.kv_dir.mkdir()
    target = st.kv_dir / kvdisk.file_name(session.id)
    target.write_bytes(b"a snapshot")
    st.delete(session.id)
    st.close()
    assert not target.exists() and calls == [session.id]
