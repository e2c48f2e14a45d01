"""Loading local Hugging Face checkpoints safely, and choosing device and dtype.

    from optimer_lib.checkpoints.models import load_model, load_tokenizer
    model = load_model("assets/base")          # never touches a hub
    tok = load_tokenizer("assets/base")

Only local directories are accepted (``local_files_only=True``) and remote code is
refused unless ``trust_remote_code=True`` is passed explicitly.
"""

from __future__ import annotations

import json
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


def _check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """Refuse, before transformers reads anything else, a folder whose architecture exists only as its own code."""
    if trust_remote_code:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{str(path / 'config.json')!r} is not valid JSON ({exc}): restore it from the original "
                         "checkpoint") from exc
    if isinstance(cfg, dict) and cfg.get("auto_map") and cfg.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise ModelError(f"{str(path)!r} needs custom code from its folder (architecture "
                         f"{cfg.get('model_type')!r}), which is refused by default: re-run with --trust-remote-code "
                         "(trust_remote_code=True) only if you trust its author")


def load_model(path: str | os.PathLike, *, dtype: str | torch.dtype | None = "float32",
               device: str | torch.device | None = "cpu", trust_remote_code: bool = False):
    """Load a causal LM from a local directory (safetensors, or pickle with ``weights_only``)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every load is noise in loops
    p = check_checkpoint_dir(path)
    _check_remote_code(p, trust_remote_code)
    dev = resolve_device(device)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line load report becomes one ModelError below
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
        # Mismatched shapes are reported (not raised) by transformers so that _check_loading names the tensor.
        model, info = AutoModelForCausalLM.from_pretrained(
            p, config=config, local_files_only=True, trust_remote_code=trust_remote_code,
            dtype=resolve_dtype(dtype, dev), output_loading_info=True, ignore_mismatched_sizes=True)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"{str(p)!r} needs custom code from its folder, which is refused by default: "
                             "re-run with --trust-remote-code (trust_remote_code=True) only if you trust its "
                             "author") from exc
        raise ModelError(f"cannot load model from {str(p)!r}: {exc}") from exc
    except pickle.UnpicklingError as exc:
        raise ModelError(f"refused to load {str(p)!r}: its pickle checkpoint holds more than tensors, and "
                         "unpickling it could run code; convert it to safetensors where you trust it") from exc
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"cannot load model from {str(p)!r} (missing, truncated or corrupt weights?): {exc}") from exc
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model from {str(p)!r}: {first}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_loading(p, info)
    check_finite(model, p)
    return model.to(dev).eval()


def _check_loading(path: Path, info: dict) -> None:
    """Refuse weights that do not fill the architecture of config.json (transformers would re-initialise them)."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        key, ckpt_shape, model_shape = mismatched[0]
        vocab = any(s in key for s in ("embed", "lm_head", "wte"))
        hint = ("the vocabulary size differs: make config.json's vocab_size match, or call "
                "model.resize_token_embeddings(N) and save_pretrained it again" if vocab else
                "the weights belong to another configuration: fix config.json or re-save the model")
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ModelError(f"checkpoint {str(path)!r}: tensor {key} has shape {tuple(ckpt_shape)} in the weights but "
                         f"{tuple(model_shape)} per config.json{more}: {hint}")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        unknown = sorted(info.get("unexpected_keys") or [])
        extra = f", and holds unknown tensors such as {unknown[:3]}" if unknown else ""
        raise ModelError(f"checkpoint {str(path)!r} lacks {len(missing)} tensor(s) its config.json needs, e.g. "
                         f"{missing[:3]}{extra}: its weights were renamed or belong to another architecture "
                         "(they would be randomly initialised); re-save it with save_pretrained")


def check_finite(model: torch.nn.Module, where: str | os.PathLike = "the model") -> None:
    """ModelError naming the first parameter holding NaN or Inf (a diverged or corrupt checkpoint).

    Buffers are not checked: some architectures keep -inf attention masks there on purpose.
    """
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise ModelError(f"checkpoint {str(where)!r} has NaN or Inf in {name}: it diverged or is corrupt; "
                                 "use an earlier checkpoint or re-train it with a lower learning rate")


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False):
    """Load the tokenizer saved beside a checkpoint (local only)."""
    from transformers import AutoTokenizer

    p = check_checkpoint_dir(path)
    _check_remote_code(p, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"the tokenizer of {str(p)!r} needs custom code from its folder, which is refused by "
                             "default: re-run with --trust-remote-code only if you trust its author") from exc
        raise ModelError(f"cannot load tokenizer from {str(p)!r}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
