"""Distribution vectors tau = theta_tuned - theta_base: extract, save, load, validate, compare.

    from optimer_lib.checkpoints.vectors import extract_vector, save_vector, load_vector, format_info
    vec = extract_vector("assets/base", "runs/ja", name="ja", source="runs/ja", tokens_trained=400_000)
    save_vector(vec, "vectors/ja.safetensors")          # CLI: optimer vector extract ...
    print(format_info([load_vector("vectors/ja.safetensors"), load_vector("vectors/zh.safetensors")]))

A vector is one ``.safetensors`` file (or, for large models, a folder of shards plus
``vector.safetensors.index.json``: see ``optimer_lib.checkpoints.streaming``) holding, for every floating-point
tensor of the model, the shift under the model's own tensor name, plus string metadata (``format``,
``format_version``, ``name``, ``source``, ``base_fingerprint``, ``dtype``, ``tokens_trained``).

Precision: each difference is computed in fp32 and stored in the *tuned* model's dtype, so a bf16 model
gives a bf16 vector (tiny shifts below bf16 resolution of the delta itself are rounded, as the weights
themselves are). Tied weights (``lm_head.weight`` sharing storage with the input embedding) are stored
once, under the first name ``state_dict()`` lists (the one ``save_pretrained`` keeps too).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from optimer_lib.errors import OptimerError, VectorError
from optimer_lib.fileio import normal_permissions

FORMAT = "optimer-vector"
FORMAT_VERSION = "1"
_SAMPLES = 64  # values sampled per tensor for the fingerprint: cheap even for 27B models

_VOCAB_HINT = (" (vocabulary size differs: call model.resize_token_embeddings on the base before "
               "training, or on the smaller model before extracting)")


def _is_vocab_tensor(key: str) -> bool:
    return "emb" in key or "lm_head" in key or "wte" in key


@dataclass
class DistributionVector:
    """One tau_i: ``tensors`` maps model tensor names to deltas; ``metadata`` values are strings."""

    name: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None  # set by load_vector; lets model cards cite the file

    def norm(self) -> float:
        """Global L2 norm over all tensors (accumulated in float64)."""
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.tensors.values()))

    @property
    def base_fingerprint(self) -> str:
        return self.metadata.get("base_fingerprint", "")

    @property
    def source(self) -> str:
        return self.metadata.get("source", "")

    @property
    def tokens_trained(self) -> str:
        return self.metadata.get("tokens_trained", "")


def unique_tensors(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split tied aliases off a state dict: ``(kept, {alias: kept_name})``.

    A name whose tensor shares storage with an earlier one (``lm_head.weight`` tied to the embedding) is
    an alias; the first name in iteration order is kept.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key[0] != 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t
    return kept, aliases


def as_state(obj: object, trust_remote_code: bool = False) -> Mapping[str, torch.Tensor]:
    """A state dict from a module, a mapping, or a local HF checkpoint directory."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        # Loaded through transformers (not raw safetensors) so checkpoint key renames in transformers>=5
        # weight conversions are applied and names match a loaded model's state_dict().
        from optimer_lib.checkpoints.models import check_checkpoint_dir, load_model

        path = check_checkpoint_dir(obj)
        return load_model(path, dtype=_checkpoint_dtype(path), trust_remote_code=trust_remote_code).state_dict()
    raise VectorError(f"cannot read weights from a {type(obj).__name__}: pass a model, a state dict "
                      "or a checkpoint directory")


def _checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint was saved in (so bf16 checkpoints give bf16 vectors); fp32 if unknown."""
    import json

    cfg = json.loads((path / "config.json").read_text())
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def tensor_digest(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    # float32 linspace can round the last index past the end above 2**24 entries: clamp (a no-op below)
    idx = torch.linspace(0, flat.numel() - 1, min(_SAMPLES, flat.numel()), device=flat.device).long()
    idx = idx.clamp_(max=flat.numel() - 1)
    # Rounded to bf16 so the same base loaded in fp32 or bf16 gives the same fingerprint.
    sample = flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
    return hashlib.sha256(repr(tuple(t.shape)).encode() + sample).digest()


def state_fingerprint(state: Mapping[str, torch.Tensor] | torch.nn.Module) -> str:
    """A cheap deterministic fingerprint (16 hex chars) of a model's floating-point weights.

    Hashes shape and a strided sample of each tensor, as a sorted set, so the fingerprint ignores
    tensor order, tied aliases (stored once or twice) and fp32/bf16 loading; names are left out so
    a checkpoint and a loaded model agree even where one lists ``lm_head.weight`` and the other not.
    """
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    digests = sorted({tensor_digest(t) for t in state.values() if t.is_floating_point() and t.numel()})
    h = hashlib.sha256()
    for d in digests:
        h.update(d)
    return h.hexdigest()[:16]


def extract_vector(base: object, tuned: object, *, name: str, source: str = "",
                   tokens_trained: int | None = None, trust_remote_code: bool = False) -> DistributionVector:
    """tau = tuned - base for every floating-point tensor; ``base``/``tuned``: module, state dict or dir.

    When ``tuned`` is a directory written by ``optimer train``, ``tokens_trained`` defaults to the
    count in its ``training.json``. Raises VectorError on mismatched names or shapes, or a non-finite result.
    ``trust_remote_code`` allows checkpoint directories whose architecture is custom code in the folder.
    """
    if not name:
        raise VectorError("a vector needs a name (e.g. --name ja)")
    if isinstance(tuned, (str, os.PathLike)):
        source = source or str(tuned)
        info = Path(tuned) / "training.json"
        if tokens_trained is None and info.is_file():
            tokens_trained = json.loads(info.read_text()).get("tokens_trained")
    b_state, b_alias = unique_tensors(as_state(base, trust_remote_code))
    t_state, t_alias = unique_tensors(as_state(tuned, trust_remote_code))
    b_float = {k for k, v in b_state.items() if v.is_floating_point()}
    t_float = {k for k, v in t_state.items() if v.is_floating_point()}
    # A tied alias present as a separate copy on one side only is not a missing tensor.
    only_base = sorted(b_float - t_float - set(t_alias))
    only_tuned = sorted(t_float - b_float - set(b_alias))
    if only_base or only_tuned:
        raise VectorError(
            f"base and tuned models have different tensors (only in base: {only_base[:5]}, only in tuned: "
            f"{only_tuned[:5]}): extract from a tuned model trained from this very base")
    deltas: dict[str, torch.Tensor] = {}
    for key, b in b_state.items():
        if key not in t_float or not b.is_floating_point():
            continue
        t = t_state[key]
        if t.shape != b.shape:
            hint = _VOCAB_HINT if _is_vocab_tensor(key) else ""
            raise VectorError(f"shape mismatch for {key}: base {tuple(b.shape)} vs tuned {tuple(t.shape)}"
                              f"{hint}")
        d = (t.detach().float() - b.detach().float().to(t.device)).to(t.dtype).cpu().contiguous()
        if not torch.isfinite(d).all():
            raise VectorError(f"the shift of {key} contains NaN or Inf: the tuned model diverged; "
                              "re-train it or extract from an earlier checkpoint")
        deltas[key] = d
    dtype = next(iter(deltas.values())).dtype if deltas else torch.float32
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "source": str(source),
            "base_fingerprint": state_fingerprint(b_state), "dtype": str(dtype).removeprefix("torch."),
            "tokens_trained": "" if tokens_trained is None else str(int(tokens_trained))}
    return DistributionVector(name=name, tensors=deltas, metadata=meta)


def save_vector(vec: DistributionVector, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``vec`` as one .safetensors file, atomically (temp file + rename); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise OptimerError(f"{str(path)!r} already exists: choose another --out or use --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**vec.metadata, "format": FORMAT, "format_version": FORMAT_VERSION, "name": vec.name}
    meta = {k: str(v) for k, v in meta.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: t.detach().cpu().contiguous() for k, t in vec.tensors.items()}, tmp, metadata=meta)
        normal_permissions(tmp)  # mkstemp and safetensors make it private; vectors are shared like checkpoints
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    vec.path = path
    return path


VECTOR_INDEX = "vector.safetensors.index.json"  # in a sharded vector folder (see optimer_lib.checkpoints.streaming)


def vector_files(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Path]]:
    """``(metadata, {tensor name: file})`` of a vector file or a sharded vector folder, format checked.

    Reads headers only (no tensor data), so large vectors can be streamed tensor by tensor.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        if path.is_dir():
            if not (path / VECTOR_INDEX).is_file():
                raise VectorError(f"{str(path)!r} is a folder without {VECTOR_INDEX}: pass a vector file or a "
                                  "sharded vector folder written by `optimer vector extract`")
            index = json.loads((path / VECTOR_INDEX).read_text())
            meta = {k: str(v) for k, v in index.get("metadata", {}).items() if k != "total_size"}
            files = {k: path / f for k, f in index["weight_map"].items()}
        elif path.is_file():
            with safe_open(str(path), framework="pt") as f:
                meta, files = dict(f.metadata() or {}), dict.fromkeys(f.keys(), path)
        else:
            raise VectorError(f"vector file {str(path)!r} does not exist: extract it with "
                              "`optimer vector extract --base DIR --tuned DIR --out FILE`")
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise VectorError(f"vector file is corrupt or truncated: {str(path)!r} ({exc}); re-extract it") from exc
    if meta.get("format") != FORMAT:
        raise VectorError(f"{str(path)!r} is not an OptiMer vector (format={meta.get('format')!r}); if it is a "
                          "model checkpoint, extract a vector from it with `optimer vector extract`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise VectorError(f"{str(path)!r} has vector format version {meta.get('format_version')!r}, this "
                          f"OptiMer reads version {FORMAT_VERSION}: re-extract it")
    return meta, files


def load_vector(path: str | os.PathLike) -> DistributionVector:
    """Read and validate a vector file written by :func:`save_vector`, or a sharded vector folder
    (shards plus ``vector.safetensors.index.json``, written by ``optimer_lib.checkpoints.streaming``)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    meta, files = vector_files(path)
    tensors: dict[str, torch.Tensor] = {}
    try:
        for file in dict.fromkeys(files.values()):
            with safe_open(str(file), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys() if files.get(k) == file})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise VectorError(f"vector file is corrupt or truncated: {str(path)!r} ({exc}); re-extract it") from exc
    if set(tensors) != set(files):
        raise VectorError(f"vector {str(path)!r} lacks tensors its index lists, e.g. "
                          f"{sorted(set(files) - set(tensors))[:3]}: re-extract it")
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise VectorError(f"vector {str(path)!r} has NaN or Inf in {key}: re-extract it from a healthy "
                              "checkpoint")
    return DistributionVector(name=meta.get("name") or path.stem, tensors=tensors, metadata=meta, path=path)


def check_shapes(name: str, shapes: Mapping[str, tuple[int, ...]], base_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise VectorError unless every tensor of vector ``name`` (``shapes``) is in the base with the same shape.

    Works on shapes alone, so safetensors headers suffice (``optimer plan`` checks a pool without reading tensors).
    """
    unknown = sorted(set(shapes) - set(base_shapes))
    if unknown:
        raise VectorError(f"vector {name!r} has {len(unknown)} tensor(s) the base model lacks, e.g. "
                          f"{unknown[:3]}: it was extracted from a different architecture; use its own base")
    for key, shape in shapes.items():
        if tuple(shape) != tuple(base_shapes[key]):
            hint = _VOCAB_HINT if _is_vocab_tensor(key) else ""
            raise VectorError(f"vector {name!r}: shape of {key} is {tuple(shape)} but the base has "
                              f"{tuple(base_shapes[key])}{hint}: use the base it was extracted from")


def check_compatible(vec: DistributionVector, base_state: Mapping[str, torch.Tensor] | torch.nn.Module, *,
                     base_fingerprint: str | None = None, allow_fingerprint_mismatch: bool = False) -> None:
    """Raise VectorError unless ``vec`` fits the base: known names, equal shapes, same base fingerprint.

    The fingerprint is computed only when needed (pass ``base_fingerprint`` to reuse one).
    """
    if isinstance(base_state, torch.nn.Module):
        base_state = base_state.state_dict()
    check_shapes(vec.name, {k: tuple(t.shape) for k, t in vec.tensors.items()},
                 {k: tuple(t.shape) for k, t in base_state.items()})
    if allow_fingerprint_mismatch or not vec.base_fingerprint:
        return
    fp = base_fingerprint or state_fingerprint(base_state)
    if fp != vec.base_fingerprint:
        raise VectorError(f"vector {vec.name!r} was extracted from a different base (fingerprint "
                          f"{vec.base_fingerprint}, this base {fp}): use the base it came from, or pass "
                          "--allow-base-mismatch (allow_fingerprint_mismatch=True) to merge anyway")


def _gram(vectors: Sequence[DistributionVector]) -> torch.Tensor:
    """K x K dot products, streamed tensor by tensor in float64 (never one giant concatenation)."""
    k = len(vectors)
    gram = torch.zeros(k, k, dtype=torch.float64)
    names = sorted(set().union(*(v.tensors for v in vectors))) if vectors else []
    for key in names:
        present = [i for i, v in enumerate(vectors) if key in v.tensors]
        shapes = {tuple(vectors[i].tensors[key].shape): str(vectors[i].path or vectors[i].name) for i in present}
        if len(shapes) > 1:
            (s1, n1), (s2, n2) = list(shapes.items())[:2]
            raise VectorError(f"vectors {n1!r} and {n2!r} come from different models ({key}: {s1} vs {s2}): "
                              "compare vectors extracted from one base")
        rows = torch.stack([vectors[i].tensors[key].detach().reshape(-1).cpu().double() for i in present])
        idx = torch.tensor(present)
        gram[idx.unsqueeze(1), idx.unsqueeze(0)] += rows @ rows.T
    return gram


def norms(vectors: Sequence[DistributionVector]) -> dict[str, float]:
    """Global L2 norm of each vector, by name."""
    return {v.name: v.norm() for v in vectors}


def cosine_matrix(vectors: Sequence[DistributionVector]) -> tuple[list[str], torch.Tensor]:
    """Pairwise cosine similarities (float64 K x K); a zero vector has cosine 0 with everything."""
    gram = _gram(vectors)
    n = gram.diagonal().sqrt()
    denom = n.unsqueeze(1) * n.unsqueeze(0)
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    return [v.name for v in vectors], cos


def format_info(vectors: Sequence[DistributionVector]) -> str:
    """A plain-text report: one row per vector (name, source, tokens, norm), then the cosine matrix."""
    if not vectors:
        return "(no vectors)"
    names, cos = cosine_matrix(vectors)
    w = max(8, *(len(n) for n in names))
    lines = [f"{'name':<{w}}  {'tokens':>12}  {'norm':>12}  source"]
    for v in vectors:
        lines.append(f"{v.name:<{w}}  {v.tokens_trained or '-':>12}  {v.norm():>12.4f}  {v.source or '-'}")
    lines += ["", "pairwise cosine similarity", " " * w + "".join(f"  {n[:8]:>8}" for n in names)]
    for i, n in enumerate(names):
        lines.append(f"{n:<{w}}" + "".join(f"  {float(c):>8.4f}" for c in cos[i]))
    bases = sorted({v.base_fingerprint for v in vectors if v.base_fingerprint})
    if len(bases) > 1:
        lines += ["", f"note: these vectors were extracted from {len(bases)} different bases (fingerprints "
                  f"{', '.join(bases)}): a cosine across bases compares unrelated shifts"]
    return "\n".join(lines)
