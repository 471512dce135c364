"""Everything offgrid-jupyter takes from llama-cpp-python beyond its public API, in one place.

The engine needs a few things ``llama_cpp.Llama`` does not offer publicly:

- the exact prompt a chat handler would build (we run the handler against a
  stand-in whose ``create_completion`` captures its arguments);
- a per-token hook inside ``create_completion`` (to count tokens, stamp the first,
  stop within one token, and tune threads), done by shadowing ``Llama.generate``;
- the context's tokens and KV cells (``input_ids``, ``n_tokens``, ``_ctx``), to
  snapshot one conversation and restore another with llama.cpp's per-sequence
  state API;
- quiet loading that does not swap the process's stdout/stderr
  (``suppress_stdout_stderr`` in ``llama_cpp.llama`` and ``llama_cpp._internals``).

:func:`check_compat` names each of them; ``tests/test_llamacpp.py`` calls it, so
an upgrade of llama-cpp-python that moves one fails loudly in one test, not as an
``AttributeError`` deep inside a generation.
"""

from __future__ import annotations

import ctypes
import inspect
from typing import Any, Callable, Iterator

import numpy as np

from .errors import InvalidModelError, OffgridError, UnsupportedSchemaError

# (where, attribute) pairs the adapter relies on; checked by check_compat()
MODULE_ATTRIBUTES = [
    # grammar-checked sampling (GrammarChecked)
    ("llama_cpp", "llama_sampler_init_grammar"),
    ("llama_cpp", "llama_sampler_apply"),
    ("llama_cpp", "llama_sampler_accept"),
    ("llama_cpp", "llama_sampler_free"),
    ("llama_cpp", "llama_get_logits_ith"),
    ("llama_cpp", "llama_token_data"),
    ("llama_cpp", "llama_token_data_array"),
    ("llama_cpp.llama_grammar", "json_schema_to_gbnf"),  # checking a schema before a request is queued
    ("llama_cpp.llama_grammar", "LlamaGrammar"),  # the grammar of a reply that offers tools
    ("llama_cpp.llama", "suppress_stdout_stderr"),
    ("llama_cpp._internals", "suppress_stdout_stderr"),
    ("llama_cpp", "llama_state_seq_get_size"),
    ("llama_cpp", "llama_state_seq_get_data"),
    ("llama_cpp", "llama_state_seq_set_data"),
    ("llama_cpp", "llama_set_abort_callback"),
    ("llama_cpp", "ggml_abort_callback"),
    ("llama_cpp", "llama_set_n_threads"),
    ("llama_cpp", "llama_vocab_is_eog"),
    ("llama_cpp.llama_chat_format", "get_chat_completion_handler"),
]
INSTANCE_ATTRIBUTES = ["ctx", "_ctx", "input_ids", "n_tokens", "_requires_eval", "chat_handler", "_chat_handlers",
                       "chat_format", "_model", "generate", "create_completion", "tokenize", "_init_sampler",
                       "_n_vocab"]


class IncompatibleLlamaError(OffgridError):
    code = "incompatible_llama_cpp"
    status = 500


def _version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "?")


def check_compat(llm: Any = None) -> None:
    """Raise :class:`IncompatibleLlamaError` naming every private piece of
    llama-cpp-python we use that is missing (module level, and on *llm* if given)."""
    import importlib

    missing = []
    for module, attr in MODULE_ATTRIBUTES:
        if not hasattr(importlib.import_module(module), attr):
            missing.append(f"{module}.{attr}")
    if llm is not None:
        missing += [f"Llama.{a}" for a in INSTANCE_ATTRIBUTES if not hasattr(llm, a)]
        if hasattr(llm, "_ctx") and not hasattr(llm._ctx, "kv_cache_seq_rm"):
            missing.append("Llama._ctx.kv_cache_seq_rm")
        if hasattr(llm, "_model") and not hasattr(llm._model, "vocab"):
            missing.append("Llama._model.vocab")
        params = inspect.signature(type(llm).generate).parameters
        if "tokens" not in params:
            missing.append("Llama.generate(tokens, ...)")
    if missing:
        raise IncompatibleLlamaError(
            f"llama-cpp-python {_version()} no longer has {', '.join(missing)}, which offgrid-jupyter uses "
            "(see offgrid_jupyter/llamacpp.py). Install a version within the range pyproject.toml gives.")


class GrammarChecked:
    """A sampler that checks the grammar against the token the chain picked, not against
    every candidate: llama-cpp-python puts the grammar inside the chain, where it parses each
    of the vocabulary's 49,152 candidate pieces for every token (structured output decoded
    at half speed). Here the chain samples as usual; the grammar looks at that one token, and
    only when it refuses it are the logits filtered by the grammar and sampled again, which is
    what llama.cpp's own common sampler does. Both see every accepted token."""

    def __init__(self, llm: Any, chain: Any, grammar: Any):
        import llama_cpp

        self._c = llama_cpp
        self.chain = chain  # a llama_cpp._internals.LlamaSampler (owns and frees its chain)
        self.grammar = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
        n = self.n_vocab = llm._n_vocab
        self.data = (llama_cpp.llama_token_data * n)()
        self.view = np.ctypeslib.as_array(self.data)  # fields id, logit, p
        self.ids = np.arange(n, dtype=np.int32)
        self.candidates = llama_cpp.llama_token_data_array(data=self.data, size=n, selected=-1, sorted=False)
        self.one = (llama_cpp.llama_token_data * 1)()
        self.single = llama_cpp.llama_token_data_array(data=self.one, size=1, selected=-1, sorted=False)

    def _pick(self, ctx: Any, idx: int, *, grammar_first: bool) -> int:
        c = self._c
        logits = np.ctypeslib.as_array(c.llama_get_logits_ith(ctx.ctx, idx), shape=(self.n_vocab,))
        self.view["id"], self.view["logit"], self.view["p"] = self.ids, logits, 0.0
        self.candidates.size, self.candidates.selected, self.candidates.sorted = self.n_vocab, -1, False
        if grammar_first:
            c.llama_sampler_apply(self.grammar, ctypes.byref(self.candidates))
        c.llama_sampler_apply(self.chain.sampler, ctypes.byref(self.candidates))
        return int(self.candidates.data[self.candidates.selected].id)  # (a sampler may sort in place)

    def _allowed(self, token: int) -> bool:
        self.one[0].id, self.one[0].logit, self.one[0].p = token, 1.0, 0.0
        self.single.size, self.single.selected, self.single.sorted = 1, -1, False
        self._c.llama_sampler_apply(self.grammar, ctypes.byref(self.single))
        return self.one[0].logit != float("-inf")

    def sample(self, ctx: Any, idx: int = -1) -> int:
        token = self._pick(ctx, idx, grammar_first=False)
        if not self._allowed(token):
            token = self._pick(ctx, idx, grammar_first=True)
        self._c.llama_sampler_accept(self.grammar, token)
        self._c.llama_sampler_accept(self.chain.sampler, token)
        return token

    def __del__(self) -> None:
        if getattr(self, "grammar", None) is not None:
            self._c.llama_sampler_free(self.grammar)
            self.grammar = None


def grammar_for(schema: dict) -> str:
    """The GBNF grammar llama-cpp-python's chat handler will build from *schema* (the same
    converter), or a 400 naming the construct it cannot express."""
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except (AssertionError, ValueError, KeyError, TypeError, NotImplementedError, RecursionError) as exc:
        raise UnsupportedSchemaError(f"The JSON schema cannot be used as a constraint: {str(exc)[:300] or type(exc).__name__}. "
                                  "Simplify or drop that part of the schema.") from None


def tool_grammar(calls: dict, answer_schema: dict | None, *, answer: bool) -> str:
    """The GBNF grammar of a reply that offers tools: one call matching *calls* (a JSON
    schema, see tools.call_schema), or, when *answer* is allowed, a final answer: plain text
    that does not start with "{", or JSON matching *answer_schema* when the reply is structured."""
    if not answer:
        return grammar_for(calls)
    if answer_schema is not None:
        return grammar_for({"anyOf": [calls, answer_schema]})
    call = grammar_for(calls)
    lines = call.splitlines()
    renamed = [("offgrid-call ::=" + line[len("root ::="):]) if line.startswith("root ::=") else line for line in lines]
    return "\n".join(renamed + ['root ::= [ \\t\\n]* (offgrid-call | offgrid-answer)',
                                 'offgrid-answer ::= [^{ \\t\\n] [^\\x00]*']) + "\n"


def grammar(text: str) -> Any:
    """A llama-cpp-python grammar object for a GBNF string (what the chat handler takes)."""
    from llama_cpp.llama_grammar import LlamaGrammar

    try:
        return LlamaGrammar.from_string(text, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise UnsupportedSchemaError(f"The tools' schemas make a grammar llama.cpp cannot read: {exc}.") from None


class _NoRedirect:
    """Stands in for llama-cpp-python's ``suppress_stdout_stderr``: from the engine
    thread, swapping the process's stdout/stderr (and fds 1/2) would swallow the
    kernel's own output meanwhile and undo redirects the user's code makes."""

    def __init__(self, disable: bool = True):
        pass

    def __enter__(self) -> "_NoRedirect":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _PromptCaptured(Exception):
    def __init__(self, kwargs: dict):
        self.kwargs = kwargs


class _CaptureLlama:
    """Stands in for the Llama when running a chat handler, to capture the exact
    ``create_completion`` call it would make (prompt tokens, stop strings,
    stopping criteria) without generating. Everything else is the real Llama."""

    def __init__(self, llm):
        self._llm = llm

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def create_completion(self, **kwargs):
        raise _PromptCaptured(kwargs)


class LlamaModel:
    """One loaded GGUF: a ``llama_cpp.Llama`` plus the few private operations the engine needs.
    Not thread-safe: the engine thread is its only user."""

    def __init__(self, path: str, *, n_ctx: int, n_batch: int, n_threads: int, chat_format: str | None,
                 should_abort: Callable[[], bool] = lambda: False):
        import llama_cpp
        import llama_cpp._internals
        import llama_cpp.llama

        check_compat()
        llama_cpp.llama.suppress_stdout_stderr = _NoRedirect
        llama_cpp._internals.suppress_stdout_stderr = _NoRedirect
        try:
            self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                       n_threads_batch=n_threads, chat_format=chat_format, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise InvalidModelError(f"llama.cpp could not load the model {path}: {exc}. "
                                    "The file may be truncated or of an unsupported architecture.") from exc
        check_compat(self.llm)
        self._abort_cb = llama_cpp.ggml_abort_callback(lambda _data: bool(should_abort()))
        self._no_abort_cb = llama_cpp.ggml_abort_callback(0)
        real_init_sampler = self.llm._init_sampler

        def init_sampler(*args: Any, grammar: Any = None, **kwargs: Any) -> Any:
            chain = real_init_sampler(*args, **kwargs)  # the same chain, without the grammar in it
            return chain if grammar is None else GrammarChecked(self.llm, chain, grammar)

        self.llm._init_sampler = init_sampler  # shadows the method on this instance only
        self.threads = (n_threads, n_threads)

    @property
    def chat_format(self) -> str | None:
        return self.llm.chat_format

    # -- prompts ---------------------------------------------------------------------
    def format(self, messages: list[dict], **sampling: Any) -> dict:
        """Run the model's chat handler (its GGUF template, or the chat_format override)
        exactly as create_chat_completion would; returns the create_completion kwargs."""
        from llama_cpp import llama_chat_format

        llm = self.llm
        handler = (llm.chat_handler or llm._chat_handlers.get(llm.chat_format)
                   or llama_chat_format.get_chat_completion_handler(llm.chat_format))
        try:
            handler(llama=_CaptureLlama(llm), messages=messages, stream=True, **sampling)
        except _PromptCaptured as captured:
            return captured.kwargs
        raise OffgridError("The chat handler did not produce a prompt.")  # pragma: no cover

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    # -- the context's tokens and KV cells -----------------------------------------------
    @property
    def tokens(self) -> np.ndarray:
        """The tokens whose KV cells are in the context now."""
        return self.llm.input_ids[: self.llm.n_tokens]

    def reset(self) -> None:
        """Forget the context's contents (state unknown after a failure)."""
        self.llm.n_tokens = 0

    def snapshot(self) -> tuple[np.ndarray, ctypes.Array]:
        """The current conversation's tokens and KV cells (sequence 0), a few ms."""
        import llama_cpp

        llm = self.llm
        llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)  # cells past n_tokens are stale
        size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        llama_cpp.llama_state_seq_get_data(llm.ctx, buf, size, 0)
        return llm.input_ids[: llm.n_tokens].copy(), buf

    def restore(self, tokens: np.ndarray, data: ctypes.Array) -> bool:
        """Put a snapshot back into the context; False (and an empty context) if llama.cpp refused it."""
        import llama_cpp

        llm = self.llm
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        ok = bool(llama_cpp.llama_state_seq_set_data(llm.ctx, data, len(data), 0))
        if ok:
            llm.input_ids[: len(tokens)] = tokens
            llm.n_tokens = len(tokens)
        else:
            llm.n_tokens = 0
        llm._requires_eval = True  # the restored cells carry no logits
        return ok

    # -- running ---------------------------------------------------------------------------
    def set_abort(self, on: bool) -> None:
        """Install llama.cpp's abort callback (checked between graph nodes, for long
        prompt evaluations), or remove it so decoding pays nothing for it."""
        import llama_cpp

        llama_cpp.llama_set_abort_callback(self.llm.ctx, self._abort_cb if on else self._no_abort_cb, None)

    def set_threads(self, decode: int, batch: int) -> None:
        import llama_cpp

        if (decode, batch) != self.threads:
            llama_cpp.llama_set_n_threads(self.llm.ctx, decode, batch)
            self.threads = (decode, batch)

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    def stream(self, kwargs: dict, on_token: Callable[[int], bool]) -> Iterator[dict]:
        """``create_completion(**kwargs, stream=True)``, calling *on_token(token)* for every
        sampled token before it is used; generation stops when it returns False."""
        llm = self.llm
        real_generate = llm.generate

        def hooked_generate(*args: Any, **kw: Any):
            for tok in real_generate(*args, **kw):
                if not on_token(tok):
                    return
                yield tok

        llm.generate = hooked_generate  # shadows the method on this instance only
        try:
            yield from llm.create_completion(**{**kwargs, "stream": True})
        finally:
            del llm.generate

    def close(self) -> None:
        self.llm.close()
