"""Continual pre-training (CPT): one model per dataset, or one model on a data mixture.

    optimer train --base assets/base --data ja --out runs/cpt-ja --tokens 400000 --lr 1e-3

    from optimer_lib.training.train import TrainConfig, train_cpt
    train_cpt("assets/base", "ja", "runs/cpt-ja", TrainConfig(tokens=400_000))
    train_cpt("assets/base", {"ja": 0.5, "math": 0.5}, "runs/mix", TrainConfig(tokens=800_000))

Batches are sampled (seeded) from packed token blocks of each dataset in proportion to the
ratios. The output directory is a normal Hugging Face checkpoint plus ``training.json``.
Training is resumable: a ``resume/`` folder is written every ``checkpoint_every`` steps and
picked up by re-running the same command; it is removed once the final model is saved.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from optimer_lib.checkpoints.models import load_model, load_tokenizer, resolve_device
from optimer_lib.data import load_corpus, pack_tokens
from optimer_lib.errors import ConfigError, MissingDependencyError, OptimerError
from optimer_lib.fileio import normal_permissions


@dataclass
class TrainConfig:
    """Hyper-parameters of one CPT run. ``tokens`` is the total budget (steps x batch x seq_len)."""

    tokens: int = 400_000
    lr: float = 1e-3
    batch_size: int = 16
    seq_len: int = 128
    warmup: float = 0.05          # fraction of steps with linear warm-up
    schedule: str = "cosine"      # "cosine" (to 10% of lr) or "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    trajectory: int = 0           # save this many evenly spaced checkpoints along the run
    save_at: tuple[int, ...] = ()  # also save checkpoints after these token counts (rounded down to whole steps)
    checkpoint_every: int = 200   # steps between resume points (0 disables)
    distributed: str = "auto"     # "auto": use accelerate when launched by `accelerate launch`; "on"; "off"

    def validate(self) -> None:
        problems = []
        if self.tokens < self.batch_size * self.seq_len:
            problems.append(f"--tokens {self.tokens} is less than one batch ({self.batch_size}x{self.seq_len})")
        if not (0 < self.lr < 1):
            problems.append(f"--lr {self.lr} must be in (0, 1)")
        if self.schedule not in ("cosine", "constant"):
            problems.append(f"--schedule {self.schedule!r}: choose cosine or constant")
        if self.distributed not in ("auto", "on", "off"):
            problems.append(f"distributed={self.distributed!r}: choose auto, on or off")
        if self.batch_size < 1 or self.seq_len < 2:
            problems.append("--batch-size must be >= 1 and --seq-len >= 2")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    final_loss: float
    seconds: float
    tokens_by_dataset: dict[str, int]


def normalise_ratios(data: str | Mapping[str, float]) -> dict[str, float]:
    """``"ja"`` -> {"ja": 1}; {"ja": 2, "zh": 2} -> {"ja": .5, "zh": .5}; refuses negatives and all-zero."""
    if isinstance(data, (str, os.PathLike)):
        return {str(data): 1.0}
    ratios = {str(k): float(v) for k, v in data.items()}
    bad = [k for k, v in ratios.items() if not math.isfinite(v) or v < 0]
    if bad or not ratios or sum(ratios.values()) <= 0:
        raise ConfigError(f"mixture ratios must be finite, >= 0 and not all zero (got {ratios})")
    total = sum(ratios.values())
    return {k: v / total for k, v in ratios.items() if v > 0}


def _lr_at(step: int, cfg: TrainConfig, steps: int) -> float:
    warm = max(1, int(cfg.warmup * steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_model(model, tokenizer, out: Path, extra: dict | None = None, keep: tuple[str, ...] = (),
                state_dict: dict | None = None) -> None:
    """save_pretrained into a temp dir beside ``out``, then swap it in (never half-written).

    Sub-folders named in ``keep`` (e.g. the trajectory checkpoints) move over into the new folder.
    ``state_dict``: full weights gathered from sharded (FSDP/ZeRO-3) processes, when not the model's own.
    """
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is not None:
        model.save_pretrained(tmp, state_dict=state_dict)
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        (tmp / "training.json").write_text(json.dumps(extra, indent=2))
    for sub in keep:
        if (out / sub).exists():
            os.replace(out / sub, tmp / sub)
    normal_permissions(tmp)  # safetensors writes the weights 0600
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _accelerator(cfg: TrainConfig):
    """An ``accelerate.Accelerator`` when running distributed (``accelerate launch``), else None."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cfg.distributed == "off" or (cfg.distributed == "auto" and not launched):
        return None
    try:
        from accelerate import Accelerator
    except ImportError as exc:
        raise MissingDependencyError("distributed training needs accelerate: pip install accelerate") from exc
    cpu = resolve_device(cfg.device).type == "cpu"
    return Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16")


def train_model(model, tokenizer, blocks: Mapping[str, torch.Tensor], ratios: Mapping[str, float],
                out_dir: str | os.PathLike, cfg: TrainConfig, *, meta: dict | None = None,
                progress: bool = True) -> TrainResult:
    """Train ``model`` in place on blocks sampled by ``ratios`` and save it to ``out_dir``.

    Under ``accelerate launch`` (or ``cfg.distributed="on"``) each process draws its own batches
    (seed + rank), gradients are averaged by accelerate, ``cfg.tokens`` is the global budget and
    only the main process writes files; resume points are then not written.
    """
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = _accelerator(cfg)
    world, rank0 = (acc.num_processes, acc.is_main_process) if acc else (1, True)
    device = acc.device if acc else resolve_device(cfg.device)
    model.to(device).train()
    names = list(ratios)
    probs = torch.tensor([ratios[n] for n in names], dtype=torch.float64)
    gen = torch.Generator().manual_seed(cfg.seed + (acc.process_index if acc else 0))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    steps = max(1, cfg.steps // world)
    start, seen, losses = 0, dict.fromkeys(names, 0), []
    resume = out / "resume"
    if acc is None and (resume / "state.pt").exists():
        state = torch.load(resume / "state.pt", weights_only=True)
        if state["config"] != asdict(cfg) or state["ratios"] != dict(ratios):
            raise OptimerError(f"{out} holds an interrupted run with other settings; "
                               "delete its resume/ folder or use another --out")
        from safetensors.torch import load_file

        model.load_state_dict(load_file(resume / "model.safetensors", device=str(device)), strict=False)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start, seen = state["step"], state["seen"]
    if acc is not None:
        model, opt = acc.prepare(model, opt)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and acc is None else None
    traj = {round(steps * (i + 1) / cfg.trajectory) for i in range(cfg.trajectory)} if cfg.trajectory else set()
    traj |= {t // (cfg.batch_size * cfg.seq_len * world) for t in cfg.save_at} - {0}
    plain = acc.unwrap_model(model) if acc else model
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), total=steps, initial=start, desc=f"train {out.name}",
               disable=not (progress and rank0), unit="step")
    for step in bar:
        which = torch.multinomial(probs, cfg.batch_size, replacement=True, generator=gen)
        rows = []
        for i in which.tolist():
            b = blocks[names[i]]
            rows.append(b[torch.randint(len(b), (1,), generator=gen).item()])
            seen[names[i]] += cfg.seq_len * world
        batch = torch.stack(rows).to(device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg, steps)
        with autocast if autocast is not None else contextlib.nullcontext():
            loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise OptimerError(f"loss became {loss.item()} at step {step}: lower --lr")
        opt.zero_grad(set_to_none=True)
        if acc is not None:
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        done = step + 1
        if done in traj and done < steps:
            full = acc.get_state_dict(model) if acc else None  # a collective: every rank takes part
            if rank0:
                _save_model(plain, tokenizer, out / "trajectory" / f"step-{done:06d}",
                            {"step": done, "tokens": done * cfg.batch_size * cfg.seq_len * world}, state_dict=full)
        if acc is None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps:
            _save_resume(model, opt, gen, cfg, ratios, done, seen, resume)
    tail = losses[-20:] or [float("nan")]
    result = TrainResult(out, steps, steps * cfg.batch_size * cfg.seq_len * world, sum(tail) / len(tail),
                         time.perf_counter() - t0, seen)
    plain.eval()
    info = {"config": asdict(cfg), "ratios": dict(ratios), "tokens_trained": result.tokens,
            "tokens_by_dataset": seen, "final_loss": result.final_loss, "seconds": result.seconds,
            "processes": world, **(meta or {})}
    full = None
    if acc is not None:
        acc.wait_for_everyone()
        # FSDP / ZeRO-3 shard the weights across processes: gather them (on every rank) before saving.
        full = acc.get_state_dict(model)
    if rank0:
        # Replacing the folder also drops the resume point, which is no longer needed.
        _save_model(plain, tokenizer, out, info, keep=("trajectory",), state_dict=full)
    return result


def _save_resume(model, opt, gen, cfg, ratios, step, seen, resume: Path) -> None:
    from safetensors.torch import save_file

    tmp = resume.with_name("resume.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    seen_ptrs: set[int] = set()
    for k in list(state):  # tied weights: safetensors refuses shared storage, keep the first name
        p = model.state_dict()[k].data_ptr()
        if p in seen_ptrs:
            del state[k]
        seen_ptrs.add(p)
    save_file(state, tmp / "model.safetensors")
    torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step, "seen": dict(seen),
                "config": asdict(cfg), "ratios": dict(ratios)}, tmp / "state.pt")
    normal_permissions(tmp)
    shutil.rmtree(resume, ignore_errors=True)
    os.replace(tmp, resume)


def check_out_dir(out_dir: str | os.PathLike, force: bool = False) -> None:
    """Refuse (OptimerError) to train into ``out_dir`` when that would replace something, unless ``force``.

    A missing or empty folder is fine, and so is one holding a resume point (``resume/``: the interrupted
    run continues). A finished run (``training.json``) or any other non-empty folder needs ``force``;
    forcing over a finished run drops its ``training.json`` and trajectory first, so a forced run that
    is interrupted is never mistaken for the old finished one.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OptimerError(f"--out {str(out)!r} is a file: give a directory for the trained model")
    if not out.is_dir() or (out / "resume" / "state.pt").exists():
        return
    finished = (out / "training.json").exists()
    if force:
        if finished:
            (out / "training.json").unlink()
            shutil.rmtree(out / "trajectory", ignore_errors=True)
        return
    if finished:
        raise OptimerError(f"{str(out)!r} holds a finished run (training.json): choose another --out, or pass "
                           "--force to train again and replace it")
    if any(out.iterdir()):
        raise OptimerError(f"{str(out)!r} exists and is not empty: choose another --out, or pass --force to "
                           "replace its contents with the trained model")


def train_cpt(base: str | os.PathLike, data: str | Mapping[str, float], out_dir: str | os.PathLike,
              cfg: TrainConfig | None = None, *, split: str = "train", progress: bool = True,
              trust_remote_code: bool = False) -> TrainResult:
    """CPT of the checkpoint at ``base`` on one dataset (name or file) or a mixture {dataset: ratio}.

    It does not check ``out_dir`` (library callers cache runs themselves); the CLI calls
    :func:`check_out_dir` first.
    """
    cfg = cfg or TrainConfig()
    cfg.validate()
    ratios = normalise_ratios(data)
    tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
    blocks = {n: pack_tokens(load_corpus(n, split), tokenizer, cfg.seq_len) for n in ratios}
    model = load_model(base, dtype="float32", device="cpu", trust_remote_code=trust_remote_code)
    return train_model(model, tokenizer, blocks, ratios, out_dir, cfg,
                       meta={"base": str(base), "data": dict(ratios), "split": split}, progress=progress)
