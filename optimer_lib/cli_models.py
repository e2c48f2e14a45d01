"""The ``optimer`` commands that make and combine checkpoints: ``train``, ``vector extract|info``, ``merge``,
``import-gguf``, ``export-gguf``. Their parsers are in :func:`optimer_lib.cli.build_parser`; each command is a
thin shell over the library, e.g. ``optimer merge --base DIR --vector ja.safetensors=0.3 --out runs/merged``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from optimer_lib.cli_search import check_pool_paths, compute_args
from optimer_lib.errors import ConfigError, OptimerError, Problems


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte...
        return False


def _ratio_spec(spec: str) -> str | dict[str, float]:
    """``ja`` or ``ja=0.5,math=0.5`` (a data mixture)."""
    if "=" not in spec or _exists(spec):
        return spec
    out = {}
    example = "use NAME or NAME=RATIO,NAME=RATIO (e.g. ja=0.5,math=0.5)"
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        try:
            out_value = float(value)
        except ValueError as exc:
            raise ConfigError(f"bad --data {spec!r}: {example}") from exc
        if not name or name in out:
            raise ConfigError(f"bad --data {spec!r}: {'a name is missing' if not name else f'{name!r} repeats'}; "
                              f"{example}")
        out[name] = out_value
    return out


def cmd_train(a: argparse.Namespace) -> None:
    from optimer_lib.training.train import TrainConfig, check_out_dir, train_cpt

    compute_args(a)  # a bad --device fails before anything loads
    cfg = TrainConfig(tokens=a.tokens, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, schedule=a.schedule,
                      seed=a.seed, device=a.device, trajectory=a.trajectory)
    data = _ratio_spec(a.data)
    cfg.validate()
    check_out_dir(a.out, force=a.force)
    res = train_cpt(a.base, data, a.out, cfg, split=a.split, trust_remote_code=a.trust_remote_code)
    print(f"saved {res.out_dir} ({res.tokens:,} tokens, final loss {res.final_loss:.3f}, {res.seconds:.0f} s)")


def _streams(a: argparse.Namespace, dirs: list[str], vectors: tuple[str, ...] = ()) -> bool:
    """``--streaming``/``--no-streaming``, else stream when a checkpoint is sharded or a vector is a folder."""
    from optimer_lib.checkpoints.streaming import is_sharded

    return a.streaming if a.streaming is not None else \
        any(is_sharded(d) for d in dirs) or any(Path(v).is_dir() for v in vectors)


def cmd_vector_extract(a: argparse.Namespace) -> None:
    from optimer_lib.checkpoints.streaming import parse_size
    from optimer_lib.checkpoints.vectors import extract_vector, save_vector

    compute_args(a, keep=True)
    parse_size(a.shard_size)  # used only when streaming, but a typo is a typo either way
    if Path(a.out).exists() and not a.force:
        raise OptimerError(f"{a.out} exists: use --force to overwrite it")
    if _streams(a, [a.base, a.tuned]):
        from optimer_lib.checkpoints.streaming import extract_vector_streaming

        res = extract_vector_streaming(a.base, a.tuned, a.out, name=a.name or Path(a.tuned).name,
                                       source=str(a.tuned), shard_size=a.shard_size, device=a.device or "cpu",
                                       dtype=a.dtype, overwrite=a.force,
                                       trust_remote_code=a.trust_remote_code)
        print(f"saved {res.path} (vector {res.metadata['name']!r}, norm {res.norm:.4f}, {res.tensors} tensors, "
              f"streamed into {res.shards} file(s))")
        return
    vec = extract_vector(a.base, a.tuned, name=a.name or Path(a.tuned).name, source=str(a.tuned),
                         trust_remote_code=a.trust_remote_code)
    if a.dtype not in (None, "auto", "keep"):
        from optimer_lib.checkpoints.models import resolve_dtype

        vec.tensors = {k: t.to(resolve_dtype(a.dtype, t.device)) for k, t in vec.tensors.items()}
        vec.metadata["dtype"] = str(next(iter(vec.tensors.values())).dtype).removeprefix("torch.")
    path = save_vector(vec, a.out, overwrite=a.force)
    print(f"saved {path} (vector {vec.name!r}, norm {vec.norm():.4f}, {len(vec.tensors)} tensors)")


def cmd_vector_info(a: argparse.Namespace) -> None:
    from optimer_lib.checkpoints.vectors import format_info, load_vector

    print(format_info([load_vector(p) for p in a.files]))


def cmd_merge(a: argparse.Namespace) -> None:
    from optimer_lib.checkpoints.streaming import parse_size
    from optimer_lib.checkpoints.vectors import vector_files
    from optimer_lib.merging.export import export_merged
    from optimer_lib.merging.methods import check_method_params
    from optimer_lib.merging.pool import open_pool
    from optimer_lib.search.specs import parse_vector_spec

    problems = getattr(a, "problems", None) or Problems()  # every mistake on the command line in one message
    problems.check(compute_args, a, keep=True)
    specs = [problems.check(parse_vector_spec, s) for s in a.vector]
    for spec in specs:
        if spec and spec[1] is None and a.method not in ("average",):
            problems.errors.append(ConfigError(f"--vector {spec[0]} has no weight: write FILE=WEIGHT (e.g. "
                                               f"{spec[0]}=0.3)"))
    params = problems.check(_params, a.param)
    if params is not None:
        problems.check(check_method_params, a.method, params)
    inst, inst_w = (problems.check(parse_vector_spec, a.instruction) or (None, None)) if a.instruction \
        else (None, None)
    check_pool_paths(problems, a.base, [spec[0] for spec in specs if spec])
    problems.check(parse_size, a.shard_size)  # used only when streaming, but a typo is a typo either way
    if Path(a.out).is_dir() and not a.force:  # a file there is refused as --out already
        problems.errors.append(OptimerError(f"{a.out} already exists: choose another --out or use --force to "
                                            "replace it"))
    problems.raise_any()
    if _streams(a, [a.base], tuple(f for f, _ in specs) + ((inst,) if inst else ())):
        from optimer_lib.merging.streamed import merge_streaming

        names = [vector_files(f)[0].get("name") or Path(f).stem for f, _ in specs]
        weights = {n: 1.0 if w is None else w for n, (_, w) in zip(names, specs, strict=True)}
        res = merge_streaming(a.base, [f for f, _ in specs], weights, a.out, method=a.method, params=params,
                              instruction=inst, instruction_weight=1.0 if inst_w is None else inst_w,
                              dtype=a.dtype, device=a.device or "cpu", shard_size=a.shard_size,
                              allow_fingerprint_mismatch=a.allow_base_mismatch, overwrite=a.force,
                              trust_remote_code=a.trust_remote_code)
        print(f"saved merged model to {res.path} (streamed into {res.shards} shard(s))")
        _maybe_gguf(a, Path(res.path))
        return
    pool = open_pool(a.base, [f for f, _ in specs], instruction=inst, device=a.device or "cpu",
                     dtype=a.dtype if a.dtype not in (None, "auto", "keep") else "float32",
                     allow_fingerprint_mismatch=a.allow_base_mismatch, trust_remote_code=a.trust_remote_code)
    weights = {v.name: (w if w is not None else 1.0) for v, (_, w) in zip(pool.vectors, specs, strict=True)}
    merger = pool.merger
    merger.method, merger.params = a.method, params
    merger.set_weights(weights, instruction_weight=inst_w if inst_w is not None else (1.0 if inst else 0.0))
    out = export_merged(pool.model, pool.tokenizer, a.out, base_path=str(a.base), vectors=pool.vectors,
                        weights=weights, method=a.method, instruction=pool.instruction,
                        instruction_weight=inst_w, method_params=params, overwrite=a.force)
    print(f"saved merged model to {out}")
    _maybe_gguf(a, Path(out))


def _maybe_gguf(a: argparse.Namespace, out: Path) -> None:
    """``merge --format gguf[-TYPE]``: the merged folder also as one GGUF file for llama.cpp."""
    if a.format != "hf":
        from optimer_lib.checkpoints.gguf_export import add_gguf_to_export

        res = add_gguf_to_export(out, dtype=a.format.partition("-")[2] or "f32", overwrite=True)
        print(f"saved {res.path} ({res.dtype}, {res.tensors} tensors, {res.bytes / 1e6:.1f} MB) for llama.cpp")


def cmd_export_gguf(a: argparse.Namespace) -> None:
    from optimer_lib.checkpoints.gguf_export import export_gguf_dir

    res = export_gguf_dir(a.checkpoint, a.out, dtype=a.dtype, overwrite=a.force)
    print(f"saved {res.path} ({res.dtype}, {res.tensors} tensors, {res.bytes / 1e6:.1f} MB, tokenizer "
          f"{res.tokenizer['model']}/{res.tokenizer['pre']}) for llama.cpp")


def _params(items: list[str]) -> dict[str, object]:
    from optimer_lib.merging.methods import parse_method_params

    return parse_method_params(items, flag="--param")


def cmd_import_gguf(a: argparse.Namespace) -> None:
    from optimer_lib.checkpoints.gguf_import import import_gguf

    res = import_gguf(a.file, a.out, dtype=a.dtype, overwrite=a.force)
    print(f"saved {res.path} ({res.model_type}, {res.parameters / 1e6:.1f}M parameters, vocab {res.vocab_size:,}, "
          f"{res.dtype}, {res.seconds:.0f} s): use it as --base")
