"""Loading local Hugging Face checkpoints safely, and choosing device and dtype.

    from optimer_lib.models import load_model, load_tokenizer
    model = load_model("assets/base")          # never touches a hub
    tok = load_tokenizer("assets/base")

Only local directories are accepted (``local_files_only=True``) and remote code is
refused unless ``trust_remote_code=True`` is passed explicitly.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError

from optimer_lib.errors import ModelError

# No hub access at run time, even for a typo that looks like a repo id.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` is bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: choose one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def check_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path if it is a local HF checkpoint directory, else raise ModelError."""
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"checkpoint directory {str(p)!r} does not exist "
                         "(pass a local Hugging Face model directory; hubs are never contacted)")
    if not (p / "config.json").is_file():
        raise ModelError(f"{str(p)!r} has no config.json: is it a Hugging Face model directory?")
    return p


def load_model(path: str | os.PathLike, *, dtype: str | torch.dtype | None = "float32",
               device: str | torch.device | None = "cpu", trust_remote_code: bool = False):
    """Load a causal LM from a local directory (safetensors, or pickle with ``weights_only``)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every load is noise in loops
    p = check_checkpoint_dir(path)
    dev = resolve_device(device)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            p, config=config, local_files_only=True, trust_remote_code=trust_remote_code,
            dtype=resolve_dtype(dtype, dev))
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"{str(p)!r} needs custom code; re-run with trust_remote_code allowed "
                             "only if you trust its author") from exc
        raise ModelError(f"cannot load model from {str(p)!r}: {exc}") from exc
    except pickle.UnpicklingError as exc:
        raise ModelError(f"refused to load {str(p)!r}: its pickle checkpoint holds more than tensors, and "
                         "unpickling it could run code; convert it to safetensors where you trust it") from exc
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"cannot load model from {str(p)!r} (missing, truncated or corrupt weights?): {exc}") from exc
    return model.to(dev).eval()


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False):
    """Load the tokenizer saved beside a checkpoint (local only)."""
    from transformers import AutoTokenizer

    p = check_checkpoint_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load tokenizer from {str(p)!r}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
