"""Export a Llama-architecture model (a merge, the base, any HF checkpoint) as one GGUF file that llama.cpp runs.

    optimer merge --base assets/base --vector ja.safetensors=0.3 --out runs/merged --format gguf   # + merged.gguf
    optimer export-gguf runs/merged runs/merged-f16.gguf --dtype f16                              # any HF folder

    from optimer_lib.checkpoints.gguf_export import export_gguf
    res = export_gguf(model, tokenizer, "runs/merged.gguf", dtype="f32")   # res.path, res.tensors, res.bytes

Tensor names come from the ``gguf`` package's own table (``gguf.get_tensor_name_map``: llama.cpp's names, the table
transformers reads back when :mod:`optimer_lib.checkpoints.gguf_import` imports a file); the query and key
projections are permuted the way llama.cpp's ``convert_hf_to_gguf.py`` does (its rotary embedding pairs
neighbouring rows, Hugging Face pairs the two halves), which the importer undoes, so an f32 export re-imports
bit for bit. A tied head is written once (``token_embd``), as llama.cpp expects. Tensors are declared first and
then read, converted and written one at a time (an exported folder is read from its safetensors without building
a model), so memory stays near one tensor. ``dtype``: ``f32`` (exact),
``f16``, ``bf16`` or ``q8_0``; one-dimensional tensors (norms) stay f32 and a ``q8_0`` tensor whose rows are not a
multiple of 32 is written f16, as llama.cpp's converter does.

Tokenizer metadata: byte-level BPE tokenizers only (the embedded world's, SmolLM2's, GPT-2's, Llama 3's):
``tokenizer.ggml.model = "gpt2"``, the vocabulary by id (ids the model has beyond the tokenizer's become
``[PAD<id>]`` tokens of type UNUSED), merges, token types (special added tokens CONTROL, other added tokens
USER_DEFINED), bos/eos/unk/pad ids, the chat template, and ``tokenizer.ggml.pre`` = ``"gpt-2"`` for a plain
byte-level pre-tokenizer (GPT-2's split), else ``"default"`` (``pre=`` overrides it: llama.cpp picks its split
regex by this name). ``add_bos_token`` says what the tokenizer itself does (``tokenizer(text)`` starts with bos
or not: the embedded world's and SmolLM2's do not; their chat templates write it); ``add_bos=`` overrides it
(this project's scoring always puts bos first, ``scoring.evaluate.encode_text``). The file is written beside
``out`` and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optimer_lib.checkpoints.gguf_import import require_gguf
from optimer_lib.errors import ConfigError, ModelError, OptimerError
from optimer_lib.fileio import normal_permissions

DTYPES = ("f32", "f16", "bf16", "q8_0")
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
_QTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    tensors: int
    bytes: int
    dtype: str
    seconds: float
    tokenizer: dict[str, Any] = field(default_factory=dict)   # model, pre, tokens, merges, bos/eos ids


def llama_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's reordering of a query/key projection's rows (``convert_hf_to_gguf.py``'s ``permute``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config_value(cfg: Any, *keys: str, default: Any = None) -> Any:
    for key in keys:
        value = getattr(cfg, key, None)
        if value is not None:
            return value
    return default


def _rope_theta(cfg: Any) -> float:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in ("default", None):
        raise ModelError(f"GGUF export writes plain RoPE only; this model uses rope_type {kind!r}: convert its "
                         "folder with llama.cpp's convert_hf_to_gguf.py instead")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def _write_hparams(w: Any, cfg: Any, dtype: str) -> None:
    import gguf

    heads = int(cfg.num_attention_heads)
    head_dim = int(_config_value(cfg, "head_dim", default=cfg.hidden_size // heads))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(heads)
    w.add_head_count_kv(int(_config_value(cfg, "num_key_value_heads", default=heads)))
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:  # llama.cpp assumes hidden/heads unless told
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype]))


def _write_tokenizer(w: Any, tokenizer: Any, vocab_size: int, pre: str | None,
                     add_bos: bool | None) -> dict[str, Any]:
    """Byte-level BPE vocabulary, merges, types and special ids (see the module docstring); returns what it wrote."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model, pre_tok = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    byte_level = pre_tok.get("type") == "ByteLevel" or any(
        p.get("type") == "ByteLevel" for p in pre_tok.get("pretokenizers", []) or [])
    if model.get("type") != "BPE" or not byte_level:
        raise ModelError("GGUF export writes byte-level BPE tokenizers only (the embedded world's, SmolLM2's, "
                         f"GPT-2's); this one is {model.get('type') or type(tokenizer).__name__}: convert the "
                         "exported folder with llama.cpp's convert_hf_to_gguf.py")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ModelError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings")
    added = {int(i): tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if pre is None:
        plain = pre_tok.get("type") == "ByteLevel" and pre_tok.get("use_regex", True)
        pre = "gpt-2" if plain else "default"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {}
    for what, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                      ("pad", w.add_pad_token_id)):
        value = getattr(tokenizer, f"{what}_token_id", None)
        if value is not None:
            add(int(value))
            ids[what] = int(value)
    if add_bos is None:  # what the tokenizer itself does: tokenizer(text) starts with bos or not
        first = tokenizer("a")["input_ids"][:1]
        add_bos = "bos" in ids and first == [ids["bos"]]
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(merges), **ids,
            "add_bos_token": add_bos, "chat_template": bool(template)}


def _plan(cfg: Any, keys: Iterable[str]) -> list[tuple[str, str]]:
    """``[(checkpoint key, gguf name)]`` of the float tensors, the tied head left out; unknown names refused
    together."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(cfg.num_hidden_layers))
    tied = getattr(cfg, "tie_word_embeddings", False)
    out, unknown = [], []
    for key in keys:
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue
        stem, _, suffix = key.rpartition(".")
        name = name_map.get_name(stem)
        if name is None:
            unknown.append(key)
        else:
            out.append((key, f"{name}.{suffix}"))
    if unknown:
        raise ModelError(f"GGUF export: no llama.cpp name for {len(unknown)} tensor(s) ({', '.join(unknown[:3])}"
                         f"{', ...' if len(unknown) > 3 else ''}): is this a plain Llama model?")
    return out


def _layout(cfg: Any, key: str, tensor: torch.Tensor) -> np.ndarray:
    """One tensor in llama.cpp's layout, float32: q/k projections permuted (see :func:`llama_permute`)."""
    heads = int(cfg.num_attention_heads)
    tensor = tensor.detach().to("cpu", torch.float32)
    if ".self_attn.q_proj." in key:
        tensor = llama_permute(tensor, heads, heads)
    elif ".self_attn.k_proj." in key:
        tensor = llama_permute(tensor, heads, int(_config_value(cfg, "num_key_value_heads", default=heads)))
    return tensor.contiguous().numpy()


def _kind(shape: Sequence[int], dtype: str) -> str:
    """The type one tensor is written in: norms (1-D) f32; q8_0 rows must be whole blocks of 32, else f16."""
    kind = dtype if len(shape) > 1 else "f32"
    return "f16" if kind == "q8_0" and shape[-1] % 32 else kind


def _encode(data: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    return data if kind == "f32" else gguf.quants.quantize(data, getattr(gguf.GGMLQuantizationType, _QTYPES[kind]))


def _add_info(w: Any, name: str, shape: Sequence[int], kind: str) -> None:
    """Declare a tensor before its data is written (so tensors stream one at a time)."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, _QTYPES[kind])
    if kind == "f32":
        w.add_tensor_info(name, tuple(shape), np.dtype(np.float32), 4 * math.prod(shape))
    elif kind == "f16":
        w.add_tensor_info(name, tuple(shape), np.dtype(np.float16), 2 * math.prod(shape), raw_dtype=qtype)
    else:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(tuple(shape), qtype)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)


def write_gguf(config: Any, shapes: Mapping[str, Sequence[int]], get: Callable[[str], torch.Tensor],
               tokenizer: Any, out: str | os.PathLike, *, dtype: str = "f32", name: str | None = None,
               pre: str | None = None, add_bos: bool | None = None, overwrite: bool = False) -> GGUFExport:
    """Write a Llama model given as its ``config``, ``{tensor name: shape}`` of its float tensors and ``get(name)``
    (read when written: one tensor in memory at a time) with ``tokenizer`` to the GGUF file ``out``.

    ConfigError for a bad ``dtype``; ModelError for an architecture, RoPE variant or tokenizer llama.cpp would
    not read from this writer; OptimerError when ``out`` exists and not ``overwrite``. See the module docstring.
    """
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ConfigError(f"unknown GGUF dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    require_gguf()
    import gguf

    if getattr(config, "model_type", None) != "llama":
        raise ModelError(f"GGUF export writes Llama-architecture models; this one is {config.model_type!r}: export "
                         "the HF folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    path = Path(out)
    if path.is_dir() or (path.exists() and not overwrite):
        raise OptimerError(f"{str(path)!r} already exists: choose another file or use --force to replace it")
    plan = _plan(config, shapes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name or path.stem)
        _write_hparams(w, config, dtype)
        tok = _write_tokenizer(w, tokenizer, int(config.vocab_size), pre, add_bos)
        for key, gname in plan:
            _add_info(w, gname, shapes[key], _kind(shapes[key], dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for key, _ in plan:
            w.write_tensor_data(_encode(_layout(config, key, get(key)), _kind(shapes[key], dtype)))
        w.close()
        normal_permissions(tmp)  # mkstemp makes it private; a model file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return GGUFExport(path=path, tensors=len(plan), bytes=path.stat().st_size, dtype=dtype,
                      seconds=time.perf_counter() - t0, tokenizer=tok)


def export_gguf(model: torch.nn.Module, tokenizer: Any, out: str | os.PathLike, **kw: Any) -> GGUFExport:
    """:func:`write_gguf` of a loaded ``LlamaForCausalLM`` (its state dict's float tensors)."""
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    return write_gguf(model.config, {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__, tokenizer,
                      out, **kw)


def export_gguf_dir(checkpoint: str | os.PathLike, out: str | os.PathLike, **kw: Any) -> GGUFExport:
    """:func:`write_gguf` of an HF checkpoint folder, read tensor by tensor from its safetensors (no model is built:
    memory stays near one tensor), with the tokenizer saved beside it."""
    from transformers import AutoConfig

    from optimer_lib.checkpoints.models import check_checkpoint_dir, load_tokenizer
    from optimer_lib.checkpoints.streaming import TensorReader, checkpoint_files

    check_checkpoint_dir(checkpoint)  # a missing folder is the user's typo, not a hub name to look up
    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    reader = TensorReader(checkpoint_files(checkpoint))
    shapes = {k: reader.info[k][0] for k in reader.files if reader.is_float(k)}
    return write_gguf(config, shapes, reader.get, load_tokenizer(checkpoint), out, **kw)


def add_gguf_to_export(folder: str | os.PathLike, *, dtype: str = "f32", overwrite: bool = False) -> GGUFExport:
    """Write ``<folder>/<folder name>-<dtype>.gguf`` for an exported merge and name it in the folder's model card."""
    folder = Path(folder)
    res = export_gguf_dir(folder, folder / f"{folder.name}-{dtype}.gguf", dtype=dtype, overwrite=overwrite)
    card = folder / "README.md"
    if card.is_file():
        note = (f"\n## GGUF\n\n`{res.path.name}` ({dtype}) holds the same model for llama.cpp, e.g. "
                f"`llama-cli -m {res.path.name} -p \"...\"` (tokenizer: byte-level BPE, pre-tokenizer "
                f"`{res.tokenizer['pre']}`, bos {'added' if res.tokenizer['add_bos_token'] else 'not added'} "
                "to a prompt, as the HF tokenizer does).\n")
        with open(card, "a", encoding="utf-8") as fh:
            fh.write(note)
    return res
