"""llama.cpp's side of bench/vs_llamacpp.py: run by that script with the llama-cpp-python venv's interpreter.

    /tmp/llama-venv/bin/python bench/_llamacpp_worker.py REQUEST.json OUT_DIR

Imports only ``llama_cpp`` and numpy (never ``optimer_lib``: the project venv must not import llama_cpp, and this
venv has no torch). ``REQUEST.json``::

    {"model": "m.gguf", "n_ctx": 512, "threads": 1,
     "sequences": [[1, 57, ...], ...],          # token ids; logits of every position -> OUT_DIR/logits_<i>.npy
     "prompts": [[1, 88, ...], ...], "new_tokens": 20,   # greedy continuations by llama.cpp's own sampler
     "texts": ["日本語 ...", ...]}              # tokenised by llama.cpp from the file's tokenizer metadata

``OUT_DIR/result.json``: llama_cpp version, n_vocab, ``generated`` (one id list per prompt), ``tokenized`` (per
text: ``plain`` without specials, ``default`` with the file's add_bos rule, ``detok``: the plain ids decoded back,
or null when not valid UTF-8) and the seconds spent. The KV cache is kept in f32 (llama.cpp's default is f16) so
that an f32 file is compared with nothing rounded on llama.cpp's side but its kernels' summation order.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from llama_cpp import Llama, __version__

GGML_TYPE_F32 = 0


def main() -> None:
    req = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    llm = Llama(model_path=req["model"], n_ctx=int(req.get("n_ctx", 512)), n_batch=int(req.get("n_ctx", 512)),
                n_ubatch=int(req.get("n_ctx", 512)), n_threads=int(req.get("threads", 1)),
                n_threads_batch=int(req.get("threads", 1)), logits_all=True, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32, seed=0, verbose=False)
    load_s = time.perf_counter() - t0
    for i, ids in enumerate(req.get("sequences", [])):
        llm.reset()
        llm.eval(ids)
        np.save(out / f"logits_{i}.npy", np.array(llm.scores[: len(ids)], dtype=np.float32))
    generated = []
    for ids in req.get("prompts", []):
        llm.reset()
        new: list[int] = []
        # temp 0 is llama.cpp's greedy sampler; no repeat penalty, no eos stop: exactly new_tokens argmax steps
        for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            new.append(int(tok))
            if len(new) == int(req.get("new_tokens", 20)):
                break
        generated.append(new)
    tokenized = []
    for text in req.get("texts", []):
        plain = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        try:
            detok: str | None = llm.detokenize(plain).decode("utf-8")
        except UnicodeDecodeError:
            detok = None
        tokenized.append({"plain": plain, "default": llm.tokenize(text.encode("utf-8"), add_bos=True,
                                                                   special=False), "detok": detok})
    (out / "result.json").write_text(json.dumps({
        "llama_cpp": __version__, "n_vocab": llm.n_vocab(), "generated": generated, "tokenized": tokenized,
        "load_s": round(load_s, 3), "seconds": round(time.perf_counter() - t0, 3)}, ensure_ascii=False))


if __name__ == "__main__":
    main()
