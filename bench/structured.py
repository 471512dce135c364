"""Structured-output benchmark on the default model, in one process and one run:

- ``schema_decode_ratio``: decode tokens/s of replies constrained to a JSON schema (a llama.cpp
  grammar checks every sampled token) over the same requests unconstrained; target >= 0.8.
- ``valid_share_unconstrained`` / ``valid_share_constrained``: the share of replies that parse
  and validate against the schema when the prompt merely asks for it, and when the reply is
  constrained: the reason the constraint exists.

The requests alternate (constrained, unconstrained) over the same seeds at temperature 0.8, so
both see the same machine.

Prints progress, then one JSON object as the last line.

    python bench/structured.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from jsonschema import Draft202012Validator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from offgrid_jupyter.inference.engine import Engine  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer"},
    "city": {"type": "string", "maxLength": 40},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
    "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}
PROMPT = ("Describe a fictional person as JSON with exactly these keys: name (string), age (integer), "
          "city (string), hobbies (a list of up to 3 strings). Reply with the JSON only.")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def valid(text: str) -> bool:
    try:
        value = json.loads(text, strict=False)
    except ValueError:
        return False
    return not list(Draft202012Validator(SCHEMA).iter_errors(value))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = ap.parse_args()
    n = 6 if args.quick else 30
    engine = Engine(n_ctx=2048)
    messages = [{"role": "user", "content": PROMPT}]
    rf = {"type": "json_object", "schema": SCHEMA}
    engine.complete(messages, max_tokens=16)  # load and warm
    speed = {"constrained": [], "unconstrained": []}
    ok = {"constrained": 0, "unconstrained": 0}
    for seed in range(n):
        for kind, extra in (("constrained", {"response_format": rf}), ("unconstrained", {})):
            r = engine.complete(messages, max_tokens=160, temperature=0.8, seed=seed, **extra)
            if r.usage["completion_tokens"] >= 8:  # too short a reply has no decode rate worth the name
                speed[kind].append(r.timings["tokens_per_second"])
            ok[kind] += valid(r.text)
        log(f"seed {seed}: valid so far {ok['constrained']} constrained, {ok['unconstrained']} unconstrained")
    engine.close()
    with_schema, without = statistics.median(speed["constrained"]), statistics.median(speed["unconstrained"])
    print(json.dumps({"requests_each": n, "schema_decode_tok_s": round(with_schema, 2),
                      "plain_decode_tok_s": round(without, 2), "schema_decode_ratio": round(with_schema / without, 3),
                      "valid_share_constrained": round(ok["constrained"] / n, 3),
                      "valid_share_unconstrained": round(ok["unconstrained"] / n, 3)}))


if __name__ == "__main__":
    main()
