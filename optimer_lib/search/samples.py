"""Sample generations per search trial: what the merged model says at that point, on a few fixed prompts.

    from optimer_lib.search.samples import TrialSampler, read_sample_prompts
    config = SearchConfig(trials=20, sample_prompts=read_sample_prompts(["prompts.txt"]), sample_tokens=24)
    run_search(merger, tokenizer, suite, objective, config)        # each trial stores its generations
    record.trial_samples(study.trials[0])      # [{"prompt": ..., "text": ...}, ...]
    # CLI: optimer search ... --sample-prompts prompts.txt --sample-tokens 24

Off by default (no prompts). Decoding is greedy, one prompt at a time (no padding), so a trial's texts depend only
on its weights: re-running the same weights gives the same texts. Generation runs inside the trial, after its
scoring and before the study is told, on the model the scorer just merged, so the trial's timestamps and a cost
ledger's seconds include it; its generated tokens and seconds are stored on the trial
(``record.TOKENS_GENERATED``, ``record.SAMPLE_SECONDS``) and the ledger adds the tokens to what the trial scored.
A pruned or failed trial stores none.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch

from optimer_lib.errors import ConfigError
from optimer_lib.merging.merger import Merger
from optimer_lib.scoring.evaluate import encode_text, max_positions, model_device, pad_token_id
from optimer_lib.search import record

MAX_PROMPTS = 16       # samples are for a person to read next to a chart, not an evaluation set
MAX_SAMPLE_TOKENS = 512


def read_sample_prompts(items: Iterable[str] | str | None) -> tuple[str, ...]:
    """Prompts from ``--sample-prompts`` values: each an existing file (one prompt per non-empty line) or a prompt.

    A literal ``\\n`` in a prompt given on the command line is a newline. More than :data:`MAX_PROMPTS` is refused.
    """
    if items is None:
        return ()
    out: list[str] = []
    for item in [items] if isinstance(items, str) else list(items):
        path = Path(item).expanduser()
        if len(item) < 4096 and "\n" not in item and path.is_file():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read --sample-prompts file {item!r}: {exc}") from exc
            out += [ln.replace("\\n", "\n") for ln in lines if ln.strip()]
        elif item.strip():
            out.append(item.replace("\\n", "\n"))
    return check_sample_settings(out, 1)[0]


def check_sample_settings(prompts: Sequence[str], tokens: int) -> tuple[tuple[str, ...], int]:
    """``(prompts, tokens)`` checked: at most :data:`MAX_PROMPTS` prompts, 1..:data:`MAX_SAMPLE_TOKENS` tokens."""
    prompts = tuple(str(p) for p in prompts if str(p).strip())
    if len(prompts) > MAX_PROMPTS:
        raise ConfigError(f"{len(prompts)} sample prompts: give at most {MAX_PROMPTS} (they are read by a person, "
                          "not scored; put an evaluation set in the objective)")
    if not isinstance(tokens, int) or not 1 <= tokens <= MAX_SAMPLE_TOKENS:
        raise ConfigError(f"sample tokens must be 1..{MAX_SAMPLE_TOKENS}, got {tokens!r} (--sample-tokens)")
    return prompts, tokens


def generate_samples(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy continuations of each prompt: ``[{"prompt", "text", "tokens"}]`` (``tokens`` generated).

    One prompt per ``generate`` call, so no padding can change a row; the prompt is encoded as the scorer encodes
    text (bos first) and cut from the left to leave room for the new tokens within the model's context.
    """
    device, pad = model_device(model), pad_token_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    limit = max_positions(model)
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = encode_text(tokenizer, prompt)
            if limit is not None:
                ids = ids[-max(1, limit - max_new_tokens):]
            x = torch.tensor([ids], dtype=torch.long, device=device)
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 min_new_tokens=0, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos,
                                 temperature=None, top_p=None, top_k=None)
            new = gen[0, len(ids):].tolist()
            out.append({"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True),
                        "tokens": len(new)})
    return out


class TrialSampler:
    """``run_trials(..., samples=TrialSampler(merger, tokenizer, prompts, tokens))``: stores a trial's generations.

    Called by the trial loop right after a trial scored (the merger then holds that trial's weights); writes
    ``record.SAMPLES`` (``[{"prompt", "text"}]``), ``record.TOKENS_GENERATED`` and ``record.SAMPLE_SECONDS``.
    """

    def __init__(self, merger: Merger, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 32) -> None:
        self.prompts, self.max_new_tokens = check_sample_settings(prompts, int(max_new_tokens))
        self.merger, self.tokenizer = merger, tokenizer

    def __call__(self, trial: optuna.Trial) -> None:
        t0 = time.perf_counter()
        gens = generate_samples(self.merger.model, self.tokenizer, self.prompts, self.max_new_tokens)
        trial.set_user_attr(record.SAMPLES, [{"prompt": g["prompt"], "text": g["text"]} for g in gens])
        trial.set_user_attr(record.TOKENS_GENERATED, sum(g["tokens"] for g in gens))
        trial.set_user_attr(record.SAMPLE_SECONDS, round(time.perf_counter() - t0, 4))


def trial_sampler(merger: Merger, tokenizer: Any, config: Any) -> TrialSampler | None:
    """The sampler of a search config (``sample_prompts``, ``sample_tokens``), or None when it asks for none."""
    prompts = tuple(getattr(config, "sample_prompts", ()) or ())
    if not prompts:
        return None
    return TrialSampler(merger, tokenizer, prompts, int(getattr(config, "sample_tokens", 32)))
