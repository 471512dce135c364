"""Every error offgrid-jupyter raises on purpose.

Each class carries a stable ``code`` (used in JSON error bodies) and the HTTP
``status`` the server maps it to, so no surface needs its own mapping table.
Messages name what was wrong and what to do about it.
"""

from __future__ import annotations


class OffgridError(Exception):
    """Base class: a problem the user can understand and act on."""

    code = "offgrid_error"
    status = 500


# -- model -----------------------------------------------------------------
class ModelError(OffgridError):
    """The model could not be found, read or loaded."""

    code = "model_error"
    status = 503


class ModelNotFoundError(ModelError):
    code = "model_not_found"


class InvalidModelError(ModelError):
    code = "invalid_model"


class IncompatibleLlamaError(OffgridError):
    """llama-cpp-python no longer has a private piece inference/llamacpp.py relies on."""

    code = "incompatible_llama_cpp"
    status = 500


class UnusableModelError(InvalidModelError):
    """A model a request (or its session's profile) names that cannot be used: the caller's 400,
    never a 503 a client would retry; the model already loaded stays loaded."""

    code = "unusable_model"
    status = 400


# -- engine ----------------------------------------------------------------
class EngineBusyError(OffgridError):
    """The generation queue is full."""

    code = "queue_full"
    status = 503


class EngineUnavailableError(OffgridError):
    """The inference engine (an OpenAI-compatible server) is unreachable, refused us, or broke a stream."""

    code = "engine_unavailable"
    status = 502


class QueueTimeoutError(OffgridError):
    """A request waited longer than the queue timeout."""

    code = "queue_timeout"
    status = 503


class TurnCancelledError(OffgridError):
    """The caller stopped a turn before it began (while it waited for its session)."""

    code = "cancelled"
    status = 499  # "client closed request": only ever raised to the caller that cancelled


class ContextOverflowError(OffgridError):
    """The prompt cannot fit in the model's context window (too large, like a body over its limit)."""

    code = "context_overflow"
    status = 413


# -- store -----------------------------------------------------------------
class StoreError(OffgridError):
    """The session database cannot be opened or is corrupt."""

    code = "store_error"
    status = 500


class InvalidRequestError(OffgridError):
    """A value given by the caller is not acceptable (bad name, role, empty content...)."""

    code = "invalid_request"
    status = 400


class UnsupportedSchemaError(InvalidRequestError):
    """A well-formed JSON schema that llama.cpp's grammars cannot express (a ``not``, a remote
    ``$ref``...): the request is valid by the contract, the server cannot honour it."""

    code = "unsupported_schema"
    status = 422


class UnknownProfileError(InvalidRequestError):
    code = "unknown_profile"


class UnknownToolError(InvalidRequestError):
    """A tool named (by a cell, or a session's profile) that is not defined where the turn runs."""

    code = "unknown_tool"


class InvalidToolsError(InvalidRequestError):
    """Tools that the contract's shapes allow but that cannot be offered together: two with one
    name, parameters that are not a valid JSON schema, a tool_choice naming none of them."""

    code = "invalid_tools"
    status = 422


class InvalidNameError(InvalidRequestError):
    code = "invalid_name"


class SessionNotFoundError(OffgridError):
    code = "session_not_found"
    status = 404


class MessageNotFoundError(OffgridError):
    code = "message_not_found"
    status = 404


class GenerationNotFoundError(OffgridError):
    code = "generation_not_found"
    status = 404


class IdempotencyConflictError(OffgridError):
    """An Idempotency-Key was used again for a different request."""

    code = "idempotency_conflict"
    status = 409


class DuplicateNameError(OffgridError):
    code = "duplicate_name"
    status = 409


class DuplicateIdError(OffgridError):
    """An imported message id already belongs to another session."""

    code = "duplicate_id"
    status = 409


class ContentTooLargeError(OffgridError):
    code = "content_too_large"
    status = 413


class ReplyCutError(OffgridError):
    """A constrained reply stopped at the token limit, so it is not complete JSON."""

    code = "reply_cut"
    status = 422


class ReplyInvalidError(OffgridError):
    """A reply did not parse or validate against the schema asked for."""

    code = "reply_invalid"
    status = 422


# -- retrieval -------------------------------------------------------------
class PathRefusedError(OffgridError):
    """A path a server will not learn: outside its root directory."""

    code = "path_refused"
    status = 403


class NothingLearnedError(InvalidRequestError):
    """Every path of a learn into a new collection failed: no collection is made, and why is said."""

    code = "nothing_learned"


class CollectionNotFoundError(OffgridError):
    code = "collection_not_found"
    status = 404


# -- the kernel's one-line failures ---------------------------------------------------
class OffgridMagicError(Exception):
    """An expected failure in a cell, shown as one line instead of a traceback (IPython's
    ``_render_traceback_``); the cell still fails, so "Run all" stops there."""

    label = "offgrid"

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[1;31m{self.label}:\x1b[0m {self}"]


class Interrupted(OffgridMagicError):
    """The kernel's Stop ended a cell's turn."""

    label = "interrupted"


# -- the server, seen from a client -------------------------------------------------------
class ServerError(OffgridError):
    """The offgrid server could not be reached, or answered with an error we have no class for."""

    code = "server_error"
    status = 502


def from_response(status: int, payload: object) -> OffgridError:
    """The error a server's ``{"error": {"message", "type", "code"}}`` body describes,
    as the same class the server raised (so callers catch what they would locally)."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return ServerError(f"The server answered HTTP {status} without an error body.")
    message = str(err.get("message") or f"HTTP {status}")
    cls = next((c for c in _all_errors() if c.__name__ == err.get("type")), None)
    if cls is None:
        exc = ServerError(message)
        exc.status = status
        return exc
    return cls(message)


def _all_errors() -> list[type]:
    out, todo = [], [OffgridError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out
