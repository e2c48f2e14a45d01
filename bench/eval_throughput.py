"""Evaluation throughput of ``mean_token_loss`` against a plain per-sample HF loop (issue 7, item 4).

    python bench/eval_throughput.py                 # ~2-4 min on 2 busy cores
    python bench/eval_throughput.py --limit 30 --reps 3 --threads 1

Same model (the embedded base, assets/base), same documents (the first ``--limit`` of each embedded
dev set: en, ja, zh, math, code), same truncation (bos + 127 tokens). Scored tokens are the
predicted ones (length - 1 per document). Three ways, timed back to back in every repetition:

- ``plain``: one document at a time, tokenised then ``model(input_ids, labels=input_ids)``; the
  document's loss times its predicted tokens is summed (what a hand-written eval loop does);
- ``plain, pre-tokenised``: the same loop on token ids prepared beforehand (isolates batching);
- ``batched, sliced logits``: the same batches scored the way mean_token_loss did before issue 7
  (``logits[:, :-1]`` reshaped, which copies all logits, then a masked per-token NLL sum);
- ``mean_token_loss``: ``optimer_lib.scoring.evaluate.mean_token_loss`` as a search calls it (length-sorted
  right-padded batches of 16, cross-entropy on the logits in place with ignored targets at pads;
  its tokenisation cache is warm after the first trial).

Figures: tokens/s of each (median of ``--reps``) and the ratios, taken per repetition then medians.
Both losses are printed so equality can be checked (token-weighted means; they agree to ~1e-5).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=100, help="documents per dev set (default 100)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from optimer_lib.checkpoints.models import load_model, load_tokenizer
    from optimer_lib.data import assets_dir, load_eval_suite
    from optimer_lib.scoring.evaluate import encode_text, mean_token_loss

    base = assets_dir() / "base"
    model, tok = load_model(base), load_tokenizer(base)
    model.eval()
    suite = load_eval_suite(None, "dev")
    docs = [d for texts in suite.texts.values() for d in texts[:a.limit]]
    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}; model {base} ({sum(p.numel() for p in model.parameters()):,} params); "
          f"{len(docs)} documents ({a.limit} per set of {', '.join(suite.texts)}); medians of {a.reps} repetitions")

    def encode(text: str) -> list[int]:
        return encode_text(tok, text)[:a.seq_len]

    def plain(pre: list[list[int]] | None) -> tuple[float, int]:
        total, count = 0.0, 0
        with torch.inference_mode():
            for i, text in enumerate(docs):
                ids = pre[i] if pre is not None else encode(text)
                if len(ids) < 2:
                    continue
                x = torch.tensor([ids], dtype=torch.long)
                loss = model(input_ids=x, labels=x).loss
                total += float(loss) * (len(ids) - 1)
                count += len(ids) - 1
        return total / count, count

    def sliced(bs: int) -> float:
        batches = sorted(pre, key=len, reverse=True)
        total, count = 0.0, 0
        with torch.inference_mode():
            for s in range(0, len(batches), bs):
                b = [x for x in batches[s:s + bs] if len(x) >= 2]
                ids = torch.full((len(b), len(b[0])), 0, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, q in enumerate(b):
                    ids[r, :len(q)], mask[r, :len(q)] = torch.tensor(q), 1
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                keep = mask[:, 1:].bool().reshape(-1)
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                        ids[:, 1:].reshape(-1), reduction="none")
                total += float(nll[keep].sum())
                count += int(keep.sum())
        return total / count

    def ours() -> float:
        # One call over all sets' documents: a trial calls it once per set; the batching is the same.
        return mean_token_loss(model, tok, docs, seq_len=a.seq_len, batch_size=a.batch_size)

    pre = [encode(t) for t in docs]
    loss_plain, tokens = plain(pre)  # warm-up of both, and the loss check
    loss_ours = ours()
    print(f"scored tokens {tokens:,}; loss plain {loss_plain:.6f}, mean_token_loss {loss_ours:.6f} "
          f"(|diff| {abs(loss_plain - loss_ours):.1e})")
    ways = {"plain": lambda: plain(None), "plain, pre-tokenised": lambda: plain(pre),
            "batched, sliced logits": lambda: sliced(a.batch_size), "mean_token_loss": ours}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(a.reps):
        for name, fn in ways.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    print("\n| way | tokens/s (median) | seconds (median) | mean_token_loss speed-up over it (median of paired reps) |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        ratio = statistics.median(t / o for t, o in zip(ts, times["mean_token_loss"], strict=True))
        print(f"| {name} | {tokens / statistics.median(ts):,.0f} | {statistics.median(ts):.2f} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
