"""Streaming extract for checkpoints larger than RAM, and the tensor-by-tensor readers the streaming merge uses.

    optimer vector extract --base big/base --tuned big/cpt-ja --out vectors/ja.safetensors --streaming
    optimer merge --base big/base --vector vectors/ja.safetensors=0.4 --out big/merged --streaming --dtype bf16

    from optimer_lib.checkpoints.streaming import extract_vector_streaming
    extract_vector_streaming("big/base", "big/cpt-ja", "vectors/ja.safetensors", name="ja", shard_size="2GB")
    # the streaming merge (a layer up): optimer_lib.merging.streamed.merge_streaming

Inputs are safetensors checkpoints (one file, or shards + ``model.safetensors.index.json``) read with
``safe_open`` one tensor at a time; outputs are written one shard at a time, so memory stays near one output
shard plus one tensor per input. A vector larger than ``shard_size`` is a folder at ``out`` (shards plus
``vector.safetensors.index.json``; ``load_vector`` reads both forms). A merge is an HF checkpoint (shards,
index, config, tokenizer files, model card, mergekit YAML) renamed into place once the base fingerprint checks.
Vectors use the loaded model's tensor names (as ``extract_vector``): checkpoint names go through transformers'
load-time renames (legacy ``gamma``/``beta``, a missing ``model.`` prefix), a tied ``lm_head`` absent from the
checkpoint is the embedding, and architectures whose weights are *converted* on load (fused MoE experts) are
refused. Deltas are computed in fp32 and stored in the tuned dtype; merges keep the base dtype unless ``dtype``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from optimer_lib.checkpoints.models import check_checkpoint_dir, resolve_device, resolve_dtype
from optimer_lib.checkpoints.vectors import (
    FORMAT,
    FORMAT_VERSION,
    VECTOR_INDEX,
    DistributionVector,
    tensor_digest,
    vector_files,
)
from optimer_lib.errors import ConfigError, ModelError, OptimerError, VectorError
from optimer_lib.fileio import normal_permissions

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|h5|msgpack|gguf)$|.*\.index\.json$|README\.md$|mergekit\.yaml$"
                      r"|training\.json$|\..*")  # not copied from the base into a merge


def parse_size(size: int | str) -> int:
    """``2_000_000``, ``"500MB"``, ``"2GB"``, ``"1GiB"`` -> bytes (decimal units as in transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"bad shard size {size!r}: use bytes or a size such as 500MB, 2GB or 1GiB")
    unit = (m.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale)


def checkpoint_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """``{tensor name: file}`` of a safetensors checkpoint directory (single file or sharded)."""
    d = check_checkpoint_dir(model_dir)
    if is_sharded(d):
        return {k: d / f for k, f in json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].items()}
    if (d / "model.safetensors").is_file():
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            return dict.fromkeys(f.keys(), d / "model.safetensors")
    raise ModelError(f"{str(d)!r} has no safetensors weights: streaming reads only safetensors; convert them, or "
                     "run without --streaming")


def is_sharded(model_dir: str | os.PathLike) -> bool:
    """True when the directory holds a sharded checkpoint (an index file): the CLI then streams by default."""
    return (Path(model_dir) / "model.safetensors.index.json").is_file()


class TensorReader:
    """Tensors one at a time from ``{name: file}``, with shapes and dtypes from the headers.

    safetensors hands out tensors backed by a memory map that lives while the file is open; opening the file
    per tensor (~30 us) lets the pages go with the tensor instead of piling up to a whole shard.
    """

    def __init__(self, files: Mapping[str, Path]) -> None:
        self.files, self.info = dict(files), {}  # info: name -> (shape, safetensors dtype)
        for file in dict.fromkeys(self.files.values()):
            with safe_open(str(file), framework="pt") as f:
                self.info.update({k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                                  for k in f.keys() if self.files.get(k) == file})
        if len(self.info) != len(self.files):
            lost = sorted(set(self.files) - set(self.info))[:3]
            raise ModelError(f"the index lists tensors its shards lack, e.g. {lost}: re-save the checkpoint")

    def is_float(self, key: str) -> bool:
        return self.info[key][1].startswith(("F", "BF"))

    def nbytes(self, key: str, dtype: torch.dtype | None = None) -> int:
        """Bytes of ``key`` in its stored dtype, or in ``dtype`` (floats only) when given."""
        item = dtype.itemsize if dtype is not None and self.is_float(key) else _ITEMSIZE.get(self.info[key][1], 4)
        return math.prod(self.info[key][0]) * item

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)


class VectorReader(TensorReader):
    """A vector file or folder read lazily; ``lookup`` maps canonical base names to the vector's names."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.meta, files = vector_files(path)
        super().__init__(files)
        self.path, self.lookup = Path(path), {}
        self.name = self.meta.get("name") or self.path.stem
        self.header = DistributionVector(name=self.name, tensors={}, metadata=self.meta, path=self.path)  # cards

    def delta(self, canonical: str, device: torch.device) -> torch.Tensor | None:
        if (key := self.lookup.get(canonical)) is None:
            return None
        d = self.get(key).to(device)
        if d.is_floating_point() and not math.isfinite(_sq_sum(d)):
            raise VectorError(f"vector {str(self.path)!r} has NaN or Inf in {key}: re-extract it")
        return d


def name_mapper(model_dir: Path, trust_remote_code: bool = False) -> tuple[Callable[[str], str | None],
                                                                           dict[str, list[str]]]:
    """``(to_model, aliases_of)`` from a weightless (meta) model of the config: checkpoint name -> canonical
    model name (None: the model has no such tensor), and canonical name -> its tied aliases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise ModelError(f"cannot stream {str(model_dir)!r}: not a transformers causal LM ({exc})") from exc
    state, first, canon = model.state_dict(keep_vars=True), {}, {}
    for k, v in state.items():
        canon[k] = first.setdefault(id(v), k)  # tied parameters are one object: the first name is canonical
    aliases_of: dict[str, list[str]] = {}
    for k, c in canon.items():
        if k != c:
            aliases_of.setdefault(c, []).append(k)
    try:  # transformers' own load-time renames (an internal API: fall back to identity if it moves)
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renames = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
    except (ImportError, AttributeError, TypeError):
        rename_source_key = None  # type: ignore[assignment]

    def to_model(key: str) -> str | None:
        if key in canon or rename_source_key is None:
            return canon.get(key)
        new, converted = rename_source_key(key, renames, converters, model.base_model_prefix, state)
        if converted is not None:
            raise VectorError(f"{type(model).__name__} checkpoints are converted when loaded ({key!r} -> {new!r}), "
                              "so they cannot be streamed tensor by tensor: run without --streaming")
        return canon.get(new)

    return to_model, aliases_of


def digest_fingerprint(digests: set[bytes]) -> str:
    """:func:`optimer_lib.checkpoints.vectors.state_fingerprint` from the per-tensor digests."""
    h = hashlib.sha256()
    for d in sorted(digests):
        h.update(d)
    return h.hexdigest()[:16]


def _sq_sum(t: torch.Tensor) -> float:
    """Sum of squares in float64 by 1M-entry chunks (no full-size temporaries); NaN/Inf if any entry is."""
    return sum(float(x.double().pow(2).sum()) for x in t.detach().reshape(-1).split(1 << 20))


def plan_shards(keys: Sequence[str], nbytes: Callable[[str], int], shard_size: int) -> list[list[str]]:
    """Greedy split of ``keys`` (in order) into shards of at most ``shard_size`` bytes (one tensor at least)."""
    plan: list[list[str]] = [[]]
    size = 0
    for k in keys:
        if plan[-1] and size + nbytes(k) > shard_size:
            plan.append([])
            size = 0
        plan[-1].append(k)
        size += nbytes(k)
    return plan


def prepare_output(out: Path, overwrite: bool) -> Path:
    """Refuse an existing ``out`` unless ``overwrite``; a temporary folder beside it to write into."""
    if out.exists() and not overwrite:
        raise OptimerError(f"{str(out)!r} already exists: choose another --out or use --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def swap_into_place(new: Path, out: Path) -> None:
    """Replace ``out`` (file or folder) with ``new`` by renames; the old one is removed afterwards."""
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


@dataclass
class StreamResult:
    """What a streaming call wrote: ``path``, shard and tensor counts, bytes, and (extract) norm and metadata."""

    path: Path
    shards: int
    tensors: int
    bytes: int
    norm: float = math.nan
    metadata: dict[str, str] = field(default_factory=dict)


def extract_vector_streaming(base_dir: str | os.PathLike, tuned_dir: str | os.PathLike, out: str | os.PathLike,
                             *, name: str, source: str = "", tokens_trained: int | None = None,
                             shard_size: int | str = "2GB", device: str = "cpu", dtype: str | None = None,
                             overwrite: bool = False, trust_remote_code: bool = False) -> StreamResult:
    """tau = tuned - base, streamed; equal to ``save_vector(extract_vector(...))`` for the same models.

    Writes one file at ``out`` when the vector fits in ``shard_size``, else a folder of shards at ``out``.
    ``dtype`` (e.g. ``"bfloat16"``) overrides the stored dtype; ``device`` is where the subtraction runs.
    ``trust_remote_code`` allows an architecture defined by code in the base folder (only its config is built).
    """
    if not name:
        raise VectorError("a vector needs a name (e.g. --name ja)")
    out, dev = Path(out), resolve_device(device)
    info = Path(tuned_dir) / "training.json"
    if tokens_trained is None and info.is_file():
        tokens_trained = json.loads(info.read_text()).get("tokens_trained")
    to_model, _ = name_mapper(check_checkpoint_dir(base_dir), trust_remote_code)
    base, tuned = TensorReader(checkpoint_files(base_dir)), TensorReader(checkpoint_files(tuned_dir))
    b_map, t_map = {}, {}  # canonical model name -> checkpoint name (floats; a tied duplicate: the first)
    for r, m in ((base, b_map), (tuned, t_map)):
        for k in r.files:
            if r.is_float(k) and (c := to_model(k)) is not None:
                m.setdefault(c, k)
    if set(b_map) != set(t_map):
        only_b, only_t = sorted(set(b_map) - set(t_map))[:5], sorted(set(t_map) - set(b_map))[:5]
        raise VectorError(f"base and tuned models have different tensors (only in base: {only_b}, only in tuned: "
                          f"{only_t}): extract from a tuned model trained from this very base")
    for c, k in b_map.items():
        if base.info[k][0] != tuned.info[t_map[c]][0]:
            raise VectorError(f"shape mismatch for {c}: base {base.info[k][0]} vs tuned {tuned.info[t_map[c]][0]}")
    out_dt = None if dtype in (None, "auto", "keep") else resolve_dtype(dtype, dev)
    keys = list(t_map)
    size = {c: tuned.nbytes(t_map[c], out_dt) for c in keys}
    plan = plan_shards(keys, size.__getitem__, parse_size(shard_size))
    tmp = prepare_output(out, overwrite)
    digests: set[bytes] = set()
    norm2, weight_map, vec_dtype = 0.0, {}, out_dt
    try:
        for i, shard in enumerate(plan):
            tensors = {}
            for c in shard:
                b, t = base.get(b_map[c]), tuned.get(t_map[c])
                d = t.to(dev).float() - b.to(dev).float()
                if b.numel():  # after the subtraction: sampling maps pages of the whole tensor anyway
                    digests.add(tensor_digest(b))
                tensors[c] = d.to(out_dt or t.dtype).cpu().contiguous()
                del b, t, d
                if not math.isfinite(sq := _sq_sum(tensors[c])):
                    raise VectorError(f"the shift of {c} contains NaN or Inf: the tuned model diverged; "
                                      "re-train it or extract from an earlier checkpoint")
                norm2, vec_dtype = norm2 + sq, vec_dtype or tensors[c].dtype
            file = f"vector-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            weight_map.update(dict.fromkeys(tensors, file))
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
                    "source": str(source or tuned_dir), "base_fingerprint": digest_fingerprint(digests),
                    "dtype": str(vec_dtype or torch.float32).removeprefix("torch."),
                    "tokens_trained": "" if tokens_trained is None else str(int(tokens_trained))}
            # complete metadata only once every base tensor is digested: in a lone file, or in the index
            save_file(tensors, str(tmp / file), metadata=meta if len(plan) == 1 else {"format": FORMAT + "-shard"})
            del tensors
        if len(plan) == 1:
            swap_into_place(normal_permissions(tmp / file), out)
        else:
            index = {"metadata": {**meta, "total_size": sum(size.values())}, "weight_map": weight_map}
            (tmp / VECTOR_INDEX).write_text(json.dumps(index, indent=2))
            swap_into_place(normal_permissions(tmp), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return StreamResult(out, len(plan), len(keys), sum(size.values()), math.sqrt(norm2), vector_files(out)[0])
