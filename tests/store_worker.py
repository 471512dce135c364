"""Subprocess helper for the multi-process store tests: appends messages to a session.

Usage: python -m tests.store_worker DB SESSION N TAG
Prints "ready" after its first commit, then one line per message.
"""

import sys

from offgrid_jupyter.chat.store import Store


def main() -> None:
    db, session, n, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    store = Store(db)
    for i in range(n):
        # a large body makes a kill land mid-write more often
        store.add_message(session, "user", f"{tag}:{i}:" + "x" * 20000, metadata={"tag": tag, "i": i})
        if i == 0:
            print("ready", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
