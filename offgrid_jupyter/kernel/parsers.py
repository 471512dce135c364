"""The magics' command lines: ``%%offgrid`` options and ``%offgrid`` subcommands (argparse).

Options are split with ``shlex`` (quoting works) and parsed with ``argparse``; a mistake is one
usage line (IPython's ``UsageError``) naming the option, never a traceback. ``HELP`` is what
``%offgrid help`` shows, made from the same table.
"""

from __future__ import annotations

import argparse
import keyword
import shlex

from IPython.core.error import UsageError

FORMATS = ("markdown", "text", "code", "json", "frame")


STRUCTURED = ("json", "frame")  # replies constrained to JSON, returned as objects


# -- argument parsing ----------------------------------------------------------------
class HelpShown(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message}. `{self.prog} -h` lists the options.")

    def exit(self, status: int = 0, message: str | None = None):
        raise HelpShown


def _identifier(value: str) -> str:
    if not value.isidentifier() or keyword.iskeyword(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid Python variable name")
    return value


def _cells(value: str) -> int | str:
    if value == "all":
        return value
    if value.isdigit() and int(value) <= 200:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r} is not a number of cells from 0 to 200, or all")


def cell_parser() -> Parser:
    p = Parser(prog="%%offgrid", description="The cell body is the prompt.")
    p.add_argument("-s", "--session", metavar="NAME", help="session to use for this cell (id or name)")
    p.add_argument("--new", action="store_true", help="start a new session (named by -s) and keep using it")
    p.add_argument("--system", metavar="TEXT", help="system prompt (stored on the session)")
    p.add_argument("--profile", metavar="NAME", help="the profile a new session is made with (with --new, or -s "
                   "naming a session that does not exist yet): its system prompt, sampling defaults and model")
    p.add_argument("-t", "--temperature", type=float, help="sampling temperature, 0 = greedy")
    p.add_argument("-n", "--max-tokens", type=int, help="longest reply, in tokens")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("-f", "--format", choices=FORMATS, help="how to show and return the reply (json: the "
                   "reply is constrained to JSON and returned parsed; frame: a list of records as a DataFrame)")
    p.add_argument("--schema", metavar="SPEC", help="constrain the reply to a schema: the name of a pydantic model, "
                   "dataclass, TypedDict or JSON-schema dict in the notebook, or inline JSON (implies -f json)")
    p.add_argument("--frame", action="store_true", help="the same as -f frame")
    p.add_argument("-o", "--output", metavar="VAR", type=_identifier,
                   help="store the reply in VAR (its text; the object with -f json/frame)")
    p.add_argument("--no-stream", action="store_true", help="show the reply only when it is complete")
    p.add_argument("--no-history", action="store_true", help="one-shot: no memory, nothing stored")
    p.add_argument("--model", metavar="PATH|NAME", help="a GGUF file (or, on an OpenAI-compatible engine, one of "
                   "its models) to answer this cell with")
    p.add_argument("--no-interpolate", action="store_true", help="leave {name} fields and @name mentions as written")
    p.add_argument("--context", metavar="N|all", type=_cells,
                   help="attach the N cells run before this one (source, output or error; all: as many as fit)")
    p.add_argument("--local", action="store_true", help="use the in-kernel model even when a server is connected")
    p.add_argument("--tools", metavar="NAME,NAME", help="offer these functions of the notebook (or @tool objects) "
                   "to the model; the calls it makes run in this kernel")
    p.add_argument("--tool-choice", metavar="auto|required|none|NAME",
                   help="as in OpenAI's API: whether the first round must call a tool (required), that tool (NAME), "
                        "or may (auto, the default)")
    p.add_argument("--max-rounds", type=int, metavar="N", help="most generations a turn with tools runs (default 4)")
    p.add_argument("--rag", nargs="?", const="", metavar="COLLECTION",
                   help="answer from your learned files (`%%offgrid learn`): the best excerpts of COLLECTION (default: "
                        "every collection) go into the prompt, and the reply lists its sources")
    p.add_argument("-k", type=int, default=None, metavar="N", help="excerpts --rag retrieves (default 5)")
    return p


SUBCOMMANDS = {
    "help": "this help",
    "status": "model, where it runs, queue, current session",
    "sessions": "all sessions, newest first, as a DataFrame",
    "use": "use session NAME for the following cells",
    "new": "start a new session [NAME] [--system TEXT]",
    "history": "show a session as a chat [NAME] [--last N]",
    "rename": "rename session OLD to NEW",
    "fork": "copy session NAME [as NEW]",
    "delete": "delete session NAME",
    "end": "mark session NAME as ended",
    "export": "write NAME (or --all) as JSON into PATH",
    "import": "read sessions from a JSON file or directory PATH",
    "model": "show the model, or switch to the GGUF at PATH (or the engine's model NAME)",
    "stats": "usage per model and session [--by session|model|hour|source] [-o VAR] [--since WHEN]",
    "chat": "open the chat panel [NAME] [-n MAX_TOKENS] [-t TEMPERATURE]",
    "connect": "use a Jupyter server's shared model [URL] [--token KEY] (default: OFFGRID_URL)",
    "disconnect": "use a model loaded in this kernel instead of the server's",
    "profiles": "the profiles sessions can be made with, as a DataFrame",
    "profile": "add NAME [--system TEXT] [-t T] [-n N] [--model M] [--tools a,b] [--max-rounds N] [--context N|all] "
               "| delete NAME",
    "fix": "propose a fix for the last cell that failed (or In[N]) as a diff; the fix goes into a new cell below "
           "[N] [-n MAX_TOKENS]",
    "edit": "propose an edit of In[N] as a diff: N INSTRUCTION... [-n MAX_TOKENS]",
    "learn": "learn files, folders or globs for --rag: PATH [PATH...] [--collection NAME] | --list | --delete NAME",
    "search": "the learned chunks that best match QUERY, as a DataFrame [-k N] [--collection NAME]",
    "engine": "generate on an OpenAI-compatible server URL [--model NAME] [--api-key KEY] [--max-concurrent N], "
              "or `local` for a GGUF in this kernel again",
}


def line_parser() -> Parser:
    p = Parser(prog="%offgrid", add_help=False)
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=Parser)
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, text in SUBCOMMANDS.items()}
    parsers["sessions"].add_argument("--limit", type=int, default=None)
    parsers["use"].add_argument("name")
    parsers["new"].add_argument("name", nargs="?")
    parsers["new"].add_argument("--system", metavar="TEXT")
    parsers["history"].add_argument("name", nargs="?")
    parsers["history"].add_argument("--last", type=int, metavar="N")
    parsers["rename"].add_argument("old")
    parsers["rename"].add_argument("new")
    parsers["fork"].add_argument("name")
    parsers["fork"].add_argument("new", nargs="?")
    parsers["delete"].add_argument("name")
    parsers["end"].add_argument("name")
    parsers["export"].add_argument("--all", action="store_true")
    parsers["export"].add_argument("args", nargs="+", metavar="NAME PATH")
    parsers["import"].add_argument("path")
    parsers["model"].add_argument("path", nargs="?")
    parsers["stats"].add_argument("--by", action="append", choices=("session", "model", "hour", "source"))
    parsers["stats"].add_argument("-o", "--output", metavar="VAR", type=_identifier,
                                  help="keep the per-request DataFrame in VAR")
    parsers["stats"].add_argument("--since", metavar="WHEN", help="e.g. 2026-11-01 or '2026-11-23 09:00'")
    parsers["stats"].add_argument("--session", metavar="NAME")
    parsers["stats"].add_argument("--model", metavar="NAME")
    parsers["chat"].add_argument("name", nargs="?")
    parsers["chat"].add_argument("-n", "--max-tokens", type=int, help="longest reply, in tokens")
    parsers["chat"].add_argument("-t", "--temperature", type=float, help="sampling temperature")
    parsers["chat"].add_argument("--rag", nargs="?", const=True, metavar="COLLECTION",
                                 help="answer every message from learned files (a collection, default all)")
    parsers["connect"].add_argument("url", nargs="?")
    parsers["connect"].add_argument("--token")
    parsers["engine"].add_argument("url", metavar="URL|local")
    parsers["profile"].add_argument("action", choices=("add", "delete"))
    parsers["profile"].add_argument("name")
    parsers["profile"].add_argument("--system", metavar="TEXT")
    parsers["profile"].add_argument("-t", "--temperature", type=float)
    parsers["profile"].add_argument("-n", "--max-tokens", type=int)
    parsers["profile"].add_argument("--seed", type=int)
    parsers["profile"].add_argument("--model", metavar="PATH|NAME")
    parsers["profile"].add_argument("--tools", metavar="NAME,NAME", help="tools the profile offers (comma-separated)")
    parsers["profile"].add_argument("--max-rounds", type=int, default=4)
    parsers["profile"].add_argument("--context", metavar="N|all", type=_cells,
                                    help="earlier cells its sessions' cells attach (--context's default)")
    parsers["learn"].add_argument("paths", nargs="*", metavar="PATH")
    parsers["learn"].add_argument("--collection", "-c", default="default", metavar="NAME")
    parsers["learn"].add_argument("--list", action="store_true", help="the collections, as a DataFrame")
    parsers["learn"].add_argument("--delete", metavar="NAME", help="delete a collection")
    parsers["learn"].add_argument("--embedding-model", metavar="GGUF",
                                  help="also embed the chunks with this GGUF and fuse its matches with BM25's in "
                                       "searches (the collection keeps it)")
    parsers["fix"].add_argument("n", nargs="?", type=int, metavar="N")
    parsers["fix"].add_argument("-n", "--max-tokens", type=int, dest="max_tokens")
    parsers["edit"].add_argument("n", type=int, metavar="N")
    parsers["edit"].add_argument("instruction", nargs="+")
    parsers["edit"].add_argument("-n", "--max-tokens", type=int, dest="max_tokens")
    parsers["search"].add_argument("query", nargs="+")
    parsers["search"].add_argument("-k", type=int, default=5)
    parsers["search"].add_argument("--collection", "-c", metavar="NAME")
    parsers["engine"].add_argument("--model", metavar="NAME")
    parsers["engine"].add_argument("--api-key", metavar="KEY")
    parsers["engine"].add_argument("--max-concurrent", type=int, metavar="N")
    return p


def split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"Could not read the options ({exc}); check the quotes.") from None


HELP = """**offgrid** — a local LLM in your notebook.

```
%%offgrid [-s NAME] [--new] [--system TEXT] [-t TEMP] [-n MAX_TOKENS] [--seed N]
          [-f markdown|text|code|json|frame] [--schema SPEC] [-o VAR] [--no-stream] [--no-history]
          [--model PATH] [--local] [--no-interpolate] [--tools a,b] [--tool-choice auto|required|none|NAME]
          [--max-rounds N] [--rag [COLLECTION]] [-k N] [--context N|all]
<prompt; {name} is replaced from your variables, {{ and }} are literal braces;
 @name attaches a description of the variable name; {Err[3]} is the traceback of In[3]>
```

`--local` runs the cell on a model in this kernel even when the kernel uses a Jupyter server's model
(needed for `--model`: the server's model is its configuration's).

| `%offgrid …` | |
|---|---|
""" + "\n".join(f"| `{k}` | {v} |" for k, v in SUBCOMMANDS.items())

