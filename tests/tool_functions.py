"""Functions the tests offer to the model as tools (a server imports them by 'tests.tool_functions:NAME')."""

from pydantic import BaseModel

from offgrid_jupyter import tool

CALLS: list[tuple[str, dict]] = []  # every call that ran in this process, in order


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    CALLS.append(("add", {"a": a, "b": b}))
    return a + b


class Point(BaseModel):
    x: float
    y: float


def distance(p: Point, q: Point | None = None) -> float:
    """Distance from point q (default: the origin) to point p."""
    q = q or Point(x=0, y=0)
    CALLS.append(("distance", {"p": p.model_dump(), "q": q.model_dump()}))
    return round(((p.x - q.x) ** 2 + (p.y - q.y) ** 2) ** 0.5, 3)


def broken(text: str) -> str:
    """Look a word up in the dictionary."""
    CALLS.append(("broken", {"text": text}))
    raise ValueError("the dictionary is closed today")
