"""Everything offgrid-jupyter takes from llama-cpp-python beyond its public API, in one place.

The engine needs a few things ``llama_cpp.Llama`` does not offer publicly:

- the exact prompt a chat handler would build (we run the handler against a
  stand-in whose ``create_completion`` captures its arguments);
- a context of our own with several sequences (``llama_context_params.n_seq_max``,
  ``kv_unified``; ``_internals.LlamaContext`` and ``LlamaBatch``), decoded in batches
  with ``llama_decode``, and each sequence's KV cells saved and restored with
  llama.cpp's per-sequence state API;
- the samplers llama-cpp-python builds (``Llama._init_sampler``, its seed rule), so a
  sequence samples exactly as ``create_completion`` would;
- quiet loading that does not swap the process's stdout/stderr
  (``suppress_stdout_stderr`` in ``llama_cpp.llama`` and ``llama_cpp._internals``).

:func:`check_compat` names each of them; ``tests/test_llamacpp.py`` calls it, so
an upgrade of llama-cpp-python that moves one fails loudly in one test, not as an
``AttributeError`` deep inside a generation.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
from typing import Any, Callable

import numpy as np

from ..errors import IncompatibleLlamaError, InvalidModelError, InvalidRequestError, OffgridError, UnsupportedSchemaError

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
    ("llama_cpp", "llama_decode"),
    ("llama_cpp._internals", "LlamaContext"),  # our own context with n_parallel sequences
    ("llama_cpp._internals", "LlamaBatch"),
    ("llama_cpp:llama_context_params", "n_seq_max"),  # (module:class, attribute)
    ("llama_cpp:llama_context_params", "kv_unified"),
    ("llama_cpp:llama_context_params", "flash_attn_type"),
    ("llama_cpp:llama_context_params", "type_k"),
    ("llama_cpp", "llama_vocab_is_eog"),
    ("llama_cpp.llama_chat_format", "get_chat_completion_handler"),
    ("llama_cpp", "LLAMA_POOLING_TYPE_NONE"),  # Embedder: a model without pooling of its own
]
INSTANCE_ATTRIBUTES = ["context_params", "chat_handler", "_chat_handlers", "chat_format", "_model", "create_completion",
                       "tokenize", "_init_sampler", "_n_vocab", "_seed", "set_seed"]


def _version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "?")


def check_compat(llm: Any = None) -> None:
    """Raise :class:`IncompatibleLlamaError` naming every private piece of
    llama-cpp-python we use that is missing (module level, and on *llm* if given)."""
    import importlib

    missing = []
    for where, attr in MODULE_ATTRIBUTES:
        module, _, cls = where.partition(":")
        owner = importlib.import_module(module)
        if cls:
            owner = getattr(owner, cls, None)
        if not hasattr(owner, attr):
            missing.append(f"{where.replace(':', '.')}.{attr}")
    if llm is not None:
        missing += [f"Llama.{a}" for a in INSTANCE_ATTRIBUTES if not hasattr(llm, a)]
        if hasattr(llm, "_model"):
            missing += [f"Llama._model.{a}" for a in ("vocab", "detokenize", "model") if not hasattr(llm._model, a)]
    if missing:
        raise IncompatibleLlamaError(
            f"llama-cpp-python {_version()} no longer has {', '.join(missing)}, which offgrid-jupyter uses "
            "(see offgrid_jupyter/inference/llamacpp.py). Install a version within the range pyproject.toml gives.")


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
        if not self.grammar:  # never sample unconstrained what was asked to be constrained
            self.grammar = None
            raise UnsupportedSchemaError("llama.cpp could not build the grammar of the reply's schema; nothing was "
                                         "generated. Simplify the schema.")
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


MAX_GRAMMAR_CHARS = 256 * 1024  # a grammar's text; the schemas' own bounds (structured.py) keep it far below
MAX_GRAMMAR_DEPTH = 1000  # nested groups: llama.cpp's parser recurses once per level (see structured.MAX_REPEAT)


def grammar_depth(text: str) -> int:
    """The deepest nesting of ``( )`` groups in GBNF *text*, outside strings, character classes and
    comments (one pass)."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"' or c == "[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


def check_grammar(text: str, what: str = "The schema") -> str:
    """Refuse a GBNF grammar llama.cpp could not build, before anything is queued: too large or too
    deep for its parser (a 400 naming the limit: past them the parser crashed the process), or one it
    refuses (undefined or left-recursive rules, "exceeds sane defaults": a 422). The parse is
    llama.cpp's own, without a vocabulary (a few ms); results are cached by the grammar's text."""
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidRequestError(f"{what} makes a grammar of {len(text):,} characters; the limit is "
                                  f"{MAX_GRAMMAR_CHARS:,}. Simplify it (fewer or shorter fields).")
    depth = grammar_depth(text)
    if depth > MAX_GRAMMAR_DEPTH:
        raise InvalidRequestError(f"{what} makes a grammar nested {depth} levels deep; the limit is "
                                  f"{MAX_GRAMMAR_DEPTH}. Lower its lengths, item counts or pattern repetitions.")
    if not _parses(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest(), text):
        raise UnsupportedSchemaError(f"{what} makes a grammar llama.cpp refuses to build (too complex for it). "
                                     "Simplify or drop that part of the schema.")
    return text


_parsed: dict[bytes, bool] = {}  # grammar digest -> whether llama.cpp builds it


def _parses(digest: bytes, text: str) -> bool:
    import llama_cpp

    if digest in _parsed:
        return _parsed[digest]
    ok = _parse(llama_cpp, text)
    if len(_parsed) >= 1024:
        _parsed.clear()
    _parsed[digest] = ok
    return ok


def _parse(llama_cpp: Any, text: str) -> bool:
    sampler = llama_cpp.llama_sampler_init_grammar(None, text.encode("utf-8"), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def grammar_for(schema: dict, what: str = "The JSON schema") -> str:
    """The GBNF grammar llama-cpp-python's chat handler will build from *schema* (the same
    converter), checked by :func:`check_grammar`; or a 400/422 naming what it cannot express."""
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        text = json_schema_to_gbnf(json.dumps(schema))
    except (AssertionError, ValueError, KeyError, TypeError, NotImplementedError, RecursionError) as exc:
        raise UnsupportedSchemaError(f"{what} cannot be used as a constraint: {str(exc)[:300] or type(exc).__name__}. "
                                     "Simplify or drop that part of the schema.") from None
    return check_grammar(text, what)


def tool_grammar(calls: dict, answer_schema: dict | None, *, answer: bool) -> str:
    """The GBNF grammar of a reply that offers tools: one call matching *calls* (a JSON
    schema, see tools.call_schema), or, when *answer* is allowed, a final answer: plain text
    that does not start with "{", or JSON matching *answer_schema* when the reply is structured."""
    what = "The tools' parameter schemas"
    if not answer:
        return grammar_for(calls, what)
    if answer_schema is not None:
        return grammar_for({"anyOf": [calls, answer_schema]}, what)
    call = grammar_for(calls, what)
    lines = call.splitlines()
    renamed = [("offgrid-call ::=" + line[len("root ::="):]) if line.startswith("root ::=") else line for line in lines]
    return check_grammar("\n".join(renamed + ['root ::= [ \\t\\n]* (offgrid-call | offgrid-answer)',
                                               'offgrid-answer ::= [^{ \\t\\n] [^\\x00]*']) + "\n", what)


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


# Attention: flash attention, keys in q8_0, values in f16. Why: llama.cpp's CPU attention computes a
# row differently depending on what else is in the batch (without flash attention, batched matrix
# products; with it and f16 keys, a lone row past 512 cells splits its cells over the threads, and 64
# rows or more take a tiled kernel), so the same greedy request could end differently beside other
# requests or with drafts (speculative.py): measured, logits 0.5 apart from the 17th or the 257th
# token on. With keys of another type than the values, every row takes the same one-row kernel
# whatever the batch, so a row's logits depend on its sequence alone (bitwise, tested). It costs
# nothing in decoding (2 cores, default model: 10.7 ms a token at 1,000 cells, 15.2 at 3,000, against
# 10.2-12.4 and 19.5-20.3 without flash attention), prompts past 1,000 tokens read ~25% slower
# (6.3 against 4.4-5.4 ms a token at 3,000), and the keys take half the memory (the cache 0.77x).
FLASH_ATTN_ENABLED = 1  # llama_flash_attn_type: -1 auto, 0 off, 1 on
TYPE_K, TYPE_V = 8, 1  # ggml_type: GGML_TYPE_Q8_0, GGML_TYPE_F16


class LlamaModel:
    """One loaded GGUF, for the engine's batched decoding. Not thread-safe: the engine thread is
    its only user.

    A ``llama_cpp.Llama`` gives the tokenizer, the chat template (its handler builds the exact
    prompt, captured by :meth:`format`) and the samplers llama-cpp-python would build
    (:meth:`sampler`). Decoding happens in a context of our own, made from the same model with
    ``n_parallel`` sequences in one unified KV cache: every step, :meth:`decode` runs one
    ``llama_decode`` over the batch the engine filled (a token for each generating sequence,
    a chunk of prompt for those still reading theirs). The Llama's own context is never
    decoded, so it is made as small as llama.cpp allows."""

    OWN_CTX = 256  # the Llama's unused context: llama.cpp pads smaller ones up to this anyway

    def __init__(self, path: str, *, n_ctx: int, n_batch: int, n_threads: int, chat_format: str | None,
                 n_parallel: int = 1, should_abort: Callable[[], bool] = lambda: False):
        import llama_cpp
        import llama_cpp._internals as internals
        import llama_cpp.llama

        check_compat()
        llama_cpp.llama.suppress_stdout_stderr = _NoRedirect
        internals.suppress_stdout_stderr = _NoRedirect
        try:
            self.llm = llama_cpp.Llama(model_path=path, n_ctx=self.OWN_CTX, n_batch=8, n_ubatch=8,
                                       n_threads=n_threads, n_threads_batch=n_threads, chat_format=chat_format,
                                       verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise InvalidModelError(f"llama.cpp could not load the model {path}: {exc}. "
                                    "The file may be truncated or of an unsupported architecture.") from exc
        check_compat(self.llm)
        params = self.llm.context_params  # a ctypes struct (copied by value into the new context)
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch  # one ubatch per decode
        params.n_seq_max, params.kv_unified = n_parallel, True  # sequences share the n_ctx cells
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type, params.type_k, params.type_v = FLASH_ATTN_ENABLED, TYPE_K, TYPE_V
        try:
            self.ctx = internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            self.llm.close()
            raise InvalidModelError(f"llama.cpp could not make a {n_ctx}-token context for {path}: {exc}.") from exc
        self.batch = internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=n_parallel, verbose=False)
        self.n_ctx, self.n_batch, self.n_parallel = n_ctx, n_batch, n_parallel
        self._abort_cb = llama_cpp.ggml_abort_callback(lambda _data: bool(should_abort()))
        self._no_abort_cb = llama_cpp.ggml_abort_callback(0)
        real_init_sampler = self.llm._init_sampler

        def init_sampler(*args: Any, grammar: Any = None, **kwargs: Any) -> Any:
            chain = real_init_sampler(*args, **kwargs)  # the same chain, without the grammar in it
            return chain if grammar is None else GrammarChecked(self.llm, chain, grammar)

        self.llm._init_sampler = init_sampler  # shadows the method on this instance only
        self.threads = (n_threads, n_threads)
        self._vocab = self.llm._model.vocab

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

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens, special=False).decode("utf-8", errors="replace")

    def fim_tokens(self) -> tuple[int, int, int] | None:
        """The model's fill-in-the-middle tokens (prefix, suffix, middle) when its GGUF names them
        (code models do; the default SmolLM2 does not), else None."""
        import llama_cpp

        ids = (llama_cpp.llama_vocab_fim_pre(self._vocab), llama_cpp.llama_vocab_fim_suf(self._vocab),
               llama_cpp.llama_vocab_fim_mid(self._vocab))
        return ids if all(i >= 0 for i in ids) else None

    def start_tokens(self) -> list[int]:
        """What a raw prompt begins with: BOS when the model's tokenizer adds one."""
        import llama_cpp

        bos = llama_cpp.llama_vocab_bos(self._vocab)
        return [bos] if llama_cpp.llama_vocab_get_add_bos(self._vocab) and bos >= 0 else []

    def piece(self, token: int) -> bytes:
        """A generated token's bytes (a multi-byte character may span several tokens)."""
        return self.llm._model.detokenize([token], special=False)

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def sampler(self, kwargs: dict) -> Any:
        """The sampler ``create_completion(**kwargs)`` would build (the same chain, the same seed
        rule), for one sequence; ``sample(ctx, i)`` picks from the logits of batch row *i* and
        accepts the token. A grammar in *kwargs* is checked as :class:`GrammarChecked` does."""
        import random

        seed = kwargs.get("seed")
        self.llm.set_seed(seed if seed is not None else random.Random(self.llm._seed).randint(0, 2**32))
        return self.llm._init_sampler(
            top_k=kwargs.get("top_k", 40), top_p=kwargs.get("top_p", 0.95), min_p=kwargs.get("min_p", 0.05),
            typical_p=kwargs.get("typical_p", 1.0), temp=kwargs.get("temperature", 0.8),
            repeat_penalty=kwargs.get("repeat_penalty", 1.0), frequency_penalty=kwargs.get("frequency_penalty", 0.0),
            presence_penalty=kwargs.get("presence_penalty", 0.0), tfs_z=kwargs.get("tfs_z", 1.0),
            mirostat_mode=kwargs.get("mirostat_mode", 0), mirostat_eta=kwargs.get("mirostat_eta", 0.1),
            mirostat_tau=kwargs.get("mirostat_tau", 5.0), grammar=kwargs.get("grammar"))

    # -- one batch ----------------------------------------------------------------------------
    def clear(self) -> None:
        self.batch.batch.n_tokens = 0

    @property
    def batched(self) -> int:
        return self.batch.batch.n_tokens

    def add(self, tokens: list[int], start: int, seq_id: int, logits_last: bool, every: bool = False) -> int:
        """Put *tokens* of sequence *seq_id* at positions start.. in the batch; the last one's
        logits are kept when *logits_last*, every one's when *every* (drafts to verify). Returns
        the last one's row."""
        b = self.batch.batch
        n0 = b.n_tokens
        for k, token in enumerate(tokens):
            i = n0 + k
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, start + k, 1, every
            b.seq_id[i][0] = seq_id
        b.n_tokens = n0 + len(tokens)
        b.logits[b.n_tokens - 1] = logits_last
        return b.n_tokens - 1

    def decode(self, *, abortable: bool = False) -> int:
        """One llama_decode of the batch: 0 done, 1 no room in the KV cache, 2 aborted (nothing of
        it kept: a batch is one ubatch), < 0 an error. *abortable* installs the abort callback
        (prompt chunks; decoding alone pays nothing for it)."""
        import llama_cpp

        llama_cpp.llama_set_abort_callback(self.ctx.ctx, self._abort_cb if abortable else self._no_abort_cb, None)
        return int(llama_cpp.llama_decode(self.ctx.ctx, self.batch.batch))

    def set_threads(self, decode: int, batch: int) -> None:
        import llama_cpp

        if (decode, batch) != self.threads:
            llama_cpp.llama_set_n_threads(self.ctx.ctx, decode, batch)
            self.threads = (decode, batch)

    # -- the sequences' KV cells ---------------------------------------------------------------
    def seq_rm(self, seq_id: int, start: int = 0) -> None:
        """Forget sequence *seq_id*'s cells from position *start* on."""
        self.ctx.kv_cache_seq_rm(seq_id, start, -1)

    def seq_save(self, seq_id: int) -> ctypes.Array:
        """Sequence *seq_id*'s KV cells, copied out (a few ms; no logits)."""
        import llama_cpp

        size = llama_cpp.llama_state_seq_get_size(self.ctx.ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        llama_cpp.llama_state_seq_get_data(self.ctx.ctx, buf, size, seq_id)
        return buf

    def seq_load(self, seq_id: int, data: ctypes.Array) -> bool:
        """Put saved cells into sequence *seq_id* (any sequence: a session's snapshot goes into the
        slot it gets); False, with the sequence left empty, if llama.cpp refused them."""
        import llama_cpp

        self.seq_rm(seq_id)
        if llama_cpp.llama_state_seq_set_data(self.ctx.ctx, data, len(data), seq_id):
            return True
        self.seq_rm(seq_id)
        return False

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.llm.close()


class Embedder:
    """A GGUF that turns text into one unit-length vector each (retrieval's optional embeddings).

    An embedding model (BERT-like: nomic-embed, bge, all-MiniLM…) says in its GGUF how its tokens
    are pooled into one vector, and llama.cpp pools them; a generative model says nothing, and
    llama.cpp hands back every token's hidden state, which are averaged here (what its own mean
    pooling would do), so any GGUF can embed, if not as well. Texts longer than the context are
    cut at it. Thread-safe: one call at a time."""

    N_CTX = 512  # what most embedding models were trained with; a chunk is a few hundred tokens

    def __init__(self, path: str, *, n_threads: int):
        import llama_cpp
        import llama_cpp._internals as internals
        import llama_cpp.llama

        llama_cpp.llama.suppress_stdout_stderr = _NoRedirect
        internals.suppress_stdout_stderr = _NoRedirect
        self.path = path
        try:
            self.llm = llama_cpp.Llama(model_path=path, embedding=True, n_ctx=self.N_CTX, n_batch=self.N_CTX,
                                       n_ubatch=self.N_CTX, n_threads=n_threads, n_threads_batch=n_threads,
                                       verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise InvalidModelError(f"llama.cpp could not load the embedding model {path}: {exc}. "
                                    "The file may be truncated or of an unsupported architecture.") from exc
        self.per_token = self.llm.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE
        self.dim = self.llm.n_embd()
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        """One float32 row of unit length per text."""
        with self._lock:
            rows = self.llm.embed(texts, normalize=not self.per_token, truncate=True)
        if not self.per_token:
            return np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, tokens in enumerate(rows):  # an empty text has no tokens: a zero vector, near nothing
            if tokens:
                mean = np.asarray(tokens, dtype=np.float32).mean(axis=0)
                out[i] = mean / (np.linalg.norm(mean) or 1.0)
        return out

    def close(self) -> None:
        self.llm.close()
