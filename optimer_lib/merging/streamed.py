"""Streaming merge for checkpoints larger than RAM: base + merge(vectors) written shard by shard.

    optimer merge --base big/base --vector vectors/ja.safetensors=0.4 --out big/merged --streaming --dtype bf16

    from optimer_lib.merging.streamed import merge_streaming
    merge_streaming("big/base", ["vectors/ja.safetensors"], {"ja": 0.4}, "big/merged", method="optimer")

Reads the base and the vectors one tensor at a time through the readers of
:mod:`optimer_lib.checkpoints.streaming` and merges each tensor with the registry's
:func:`optimer_lib.merging.methods.merge_tensor`, so the result equals the in-memory ``merge_state_dict`` tensor
for tensor, while memory stays near one output shard plus one tensor per input. The output (shards, index,
config, tokenizer files, model card, mergekit YAML) is renamed into place once the base fingerprint checks.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from safetensors.torch import save_file

from optimer_lib.checkpoints.models import check_checkpoint_dir, resolve_device, resolve_dtype
from optimer_lib.checkpoints.streaming import (
    WEIGHT_FILES,
    StreamResult,
    TensorReader,
    VectorReader,
    checkpoint_files,
    digest_fingerprint,
    name_mapper,
    parse_size,
    plan_shards,
    prepare_output,
    swap_into_place,
)
from optimer_lib.checkpoints.vectors import tensor_digest
from optimer_lib.errors import VectorError
from optimer_lib.fileio import normal_permissions
from optimer_lib.merging.export import mergekit_config, model_card
from optimer_lib.merging.methods import check_method_params, merge_tensor, ordered_weights


def merge_streaming(base_dir: str | os.PathLike, vectors: Sequence[str | os.PathLike], weights: Mapping[str, float],
                    out_dir: str | os.PathLike, *, method: str = "optimer", params: Mapping[str, object] | None = None,
                    instruction: str | os.PathLike | None = None, instruction_weight: float = 1.0,
                    dtype: str | None = None, device: str = "cpu", shard_size: int | str = "2GB",
                    scores: Mapping[str, float] | None = None, allow_fingerprint_mismatch: bool = False,
                    overwrite: bool = False, trust_remote_code: bool = False) -> StreamResult:
    """Write base + merge(vectors, weights) as a sharded HF checkpoint equal, tensor for tensor, to the
    in-memory ``merge_state_dict``; ``weights`` maps vector names to weights, ``dtype`` overrides the base's."""
    import yaml

    params = dict(params or {})
    check_method_params(method, params)
    base_dir, out, dev = check_checkpoint_dir(base_dir), Path(out_dir), resolve_device(device)
    vecs = [VectorReader(p) for p in vectors]
    ws = ordered_weights([v.name for v in vecs], weights)
    inst = VectorReader(instruction) if instruction is not None else None
    every = [*vecs, *([inst] if inst else [])]
    to_model, aliases_of = name_mapper(base_dir, trust_remote_code)
    base = TensorReader(checkpoint_files(base_dir))
    canon = {k: to_model(k) for k in base.files if base.is_float(k)}  # checkpoint name -> model name
    accepted = {n: c for k, c in canon.items() if c for n in (c, k, *aliases_of.get(c, ()))}  # -> canonical
    shape = {c: base.info[k][0] for k, c in canon.items() if c}
    problems = []
    for v in every:  # names and shapes, from the headers, before any work
        unknown = [k for k in v.files if k not in accepted]
        wrong = [k for k in v.files if k in accepted and v.info[k][0] != shape[accepted[k]]]
        if unknown or wrong:
            problems.append(f"vector {v.name!r} does not fit this base (tensors it lacks: {unknown[:3]}, other "
                            f"shapes: {wrong[:3]}): use the base it was extracted from")
        v.lookup = {accepted[k]: k for k in v.files if k in accepted}
    if problems:
        raise VectorError("cannot merge:\n  " + "\n  ".join(problems))
    out_dt = None if dtype in (None, "auto", "keep") else resolve_dtype(dtype, dev)
    size = {k: base.nbytes(k, out_dt) for k in base.files}
    plan = plan_shards(list(base.files), size.__getitem__, parse_size(shard_size))
    tmp = prepare_output(out, overwrite)
    digests: set[bytes] = set()
    weight_map: dict[str, str] = {}
    try:
        for i, shard in enumerate(plan):
            tensors = {}
            for k in shard:
                b, c = base.get(k), canon.get(k)
                if c is not None and b.numel():
                    digests.add(tensor_digest(b))
                ds = [v.delta(c, dev) for v in vecs] if c else []
                instr = inst.delta(c, dev) if inst is not None and c else None
                if c is None or (instr is None and all(d is None for d in ds)):  # untouched: the base's own
                    t = b.to(out_dt) if out_dt is not None and b.is_floating_point() else b
                else:  # a different output dtype: merge from fp32 and round once
                    work = b.to(dev) if out_dt in (None, b.dtype) else b.to(dev).float()
                    t = merge_tensor(c, work, ds, ws, method, params, instr, float(instruction_weight))
                    t = t.to(out_dt or b.dtype)
                tensors[k] = t.cpu().contiguous()
            file = "model.safetensors" if len(plan) == 1 else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            weight_map.update(dict.fromkeys(tensors, file))
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        fp = digest_fingerprint(digests)
        bad = [v.name for v in every if v.meta.get("base_fingerprint", fp) not in ("", fp)]
        if bad and not allow_fingerprint_mismatch:
            raise VectorError(f"vector(s) {bad} were extracted from a different base (this base: {fp}): use the base "
                              "they came from, or pass --allow-base-mismatch to merge anyway")
        if len(plan) > 1:
            index = {"metadata": {"total_size": sum(size.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for f in base_dir.iterdir():  # config, generation config, tokenizer files
            if f.is_file() and not WEIGHT_FILES.fullmatch(f.name):
                shutil.copy2(f, tmp / f.name)
        cfg = json.loads((tmp / "config.json").read_text())
        if out_dt is not None:
            cfg.update({k: str(out_dt).removeprefix("torch.") for k in ("dtype", "torch_dtype")
                        if k == "dtype" or k in cfg})
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        card = dict(base_path=str(base_dir), vectors=[v.header for v in vecs], method=method,
                    weights={v.name: w for v, w in zip(vecs, ws, strict=True)},
                    instruction=inst.header if inst else None,
                    instruction_weight=float(instruction_weight) if inst else None)
        recipe = mergekit_config(**card, method_params=params, dtype=str(cfg.get("dtype") or "float32"))
        (tmp / "mergekit.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        (tmp / "README.md").write_text(model_card(**card, params=params, scores=scores, out_dir=out))
        swap_into_place(normal_permissions(tmp), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return StreamResult(out, len(plan), len(weight_map), sum(size.values()))
