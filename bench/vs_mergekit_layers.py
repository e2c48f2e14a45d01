"""mergekit itself on our per-layer-group exports (issue 19): every tensor of its merge against ours.

    .venv/bin/python bench/vs_mergekit_layers.py --mk-venv /tmp/mk-venv      # ~2-4 min on 2 busy cores

mergekit lives in its own virtual environment (how to make /tmp/mk-venv: bench/vs_mergekit.py's docstring).
Each case opens a pool (``open_pool``), merges per-layer-group weights into it (``pool.merger.set_weights``) and
exports it with ``export_merged``, the path of ``optimer_lib.search.pareto.export_point`` and the Export tab. The
``mergekit.yaml`` of that export is given to ``mergekit-yaml`` unchanged (run from the repository root, where its
relative model paths resolve). Every tensor of mergekit's output is compared with ours, and both with a float64
reference θ_base + Σ_i α(i, group) (θ_i − θ_base) computed here from the checkpoints, with each tensor's group
found by this script's own rule (:func:`hand_group`), not the library's.

Cases: the quick demo pool (``--pool``: the embedded tied 4-block Llama and its ja/zh/math/code CPT checkpoints,
built by ``optimer demo --quick``) at ``layer-groups:2``, ``:3`` (uneven slices) and ``:4``, plus a partial
override (plain weights with a few ``name@group`` keys); then random tiny checkpoints built here: an untied
6-block Llama (final norm and lm_head in ``head``) at ``layer-groups:4`` and a tied 3-block GPT-2 (``wpe``,
``ln_f`` bias) at ``layer-groups:3``. Weights are seeded draws in [-0.3, 1.0].
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("ja", "zh", "math", "code")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


# -- pure helpers (tests/test_bench_vs_mergekit_layers.py) ------------------------------------------------------
def hand_group(name: str, tied: bool, groups: list[str]) -> str:
    """The group of tensor ``name`` by this script's own reading of the issue (independent of the library)."""
    m = _BLOCK.search(name)
    if m:
        i = int(m.group(1))
        for g in groups:
            a, b = (int(x) for x in g.removeprefix("blocks").split("-")) if g.startswith("blocks") else (-1, -2)
            if a <= i <= b:
                return g
        raise ValueError(f"block {i} of {name} is in no group of {groups}")
    if "embed_tokens" in name or name.split(".")[-2] in ("wte", "wpe") or (name == "lm_head.weight" and tied):
        return "embed"
    return "head"


def alpha_of(weights: Mapping[str, float], vector: str, group: str) -> float:
    """``vector@group`` if given, else the plain ``vector`` weight, else 0 (the weight-key rule of the issue)."""
    return float(weights.get(f"{vector}@{group}", weights.get(vector, 0.0)))


def compare(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Max |a − b| over the tensors both hold, the tensor where it occurs, and the names only one side holds."""
    common = sorted(set(a) & set(b))
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in common}
    worst = max(diffs, key=lambda k: diffs[k]) if diffs else None
    return {"max_abs": diffs[worst] if worst else float("nan"), "at": worst, "tensors": len(common),
            "only_first": sorted(set(a) - set(b)), "only_second": sorted(set(b) - set(a))}


# -- checkpoints ------------------------------------------------------------------------------------------------
def _state(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def reference(base: Path, tuned: Mapping[str, Path], weights: Mapping[str, float], groups: list[str],
              tied: bool) -> dict[str, torch.Tensor]:
    """float64 θ_base + Σ_i α(i, hand_group) (θ_i − θ_base) over the tensors of the base checkpoint file."""
    b = _state(base)
    ts = {n: _state(p) for n, p in tuned.items()}
    out = {}
    for name, t in b.items():
        g = hand_group(name, tied, groups)
        out[name] = t.double() + sum((alpha_of(weights, n, g) * (s[name].double() - t.double()) for n, s in ts.items()),
                                     torch.zeros((), dtype=torch.float64))
    return out


def tiny_world(root: Path, arch: str, layers: int, names: tuple[str, ...]) -> tuple[Path, dict[str, Path]]:
    """A random tiny base and one perturbed copy per name (fake CPT runs), saved as HF checkpoint folders with the
    embedded tokenizer; their vectors (``optimer_lib`` extraction) under ``root/vectors``."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from optimer_lib.checkpoints.vectors import extract_vector, save_vector
    from optimer_lib.data import assets_dir

    tok = AutoTokenizer.from_pretrained(assets_dir() / "base", local_files_only=True)
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=layers, n_head=2,
                                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=64, tie_word_embeddings=arch == "llama"))
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    tuned = {}
    for i, n in enumerate(names):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
        m = type(model)(model.config)
        m.load_state_dict(state)
        tuned[n] = root / "cpt" / n
        m.save_pretrained(tuned[n])
        save_vector(extract_vector(base, tuned[n], name=n), root / "vectors" / f"{n}.safetensors")
    return base, tuned


# -- one case ---------------------------------------------------------------------------------------------------
def run_case(label: str, base: Path, tuned: dict[str, Path], vec_dir: Path, granularity: str, partial: bool,
             seed: int, mk_yaml: Path, tmp: Path, env: dict[str, str]) -> dict[str, object]:
    """Export one per-layer-group merge with ``export_merged``, run ``mergekit-yaml`` on its YAML, compare."""
    from optimer_lib.merging import groups as G
    from optimer_lib.merging.export import export_merged
    from optimer_lib.merging.pool import open_pool

    pool = open_pool(base, [vec_dir / f"{n}.safetensors" for n in tuned])
    gs = G.layout(pool.model, granularity)
    rng = random.Random(seed)
    keys = [f"{n}@{g}" for n in tuned for g in gs]
    if partial:  # a plain weight per vector and an override on a random half of its groups
        keys = list(tuned) + rng.sample(keys, len(keys) // 2)
    weights = {k: round(rng.uniform(-0.3, 1.0), 3) for k in keys}
    t = time.perf_counter()
    pool.merger.set_weights(weights)
    ours = export_merged(pool.model, pool.tokenizer, tmp / label / "ours", base_path=str(base), vectors=pool.vectors,
                         weights=weights)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    proc = subprocess.run([str(mk_yaml), str(ours / "mergekit.yaml"), str(tmp / label / "mk"), "--quiet"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    mk_s = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed on {ours / 'mergekit.yaml'}:\n{proc.stderr[-3000:]}")
    tied = bool(getattr(pool.model.config, "tie_word_embeddings", False))
    ref = reference(base, tuned, weights, gs, tied)
    a, b = _state(ours), _state(tmp / label / "mk")
    row = {"case": label, "granularity": granularity, "groups": gs, "weights": weights, "tied": tied,
           "mk_vs_ours": compare(b, a), "ours_vs_ref64": compare(a, ref), "mk_vs_ref64": compare(b, ref),
           "ours_vs_base": compare(a, _state(base))["max_abs"], "export_s": round(ours_s, 2),
           "mergekit_s": round(mk_s, 2)}
    print(f"| {label} | {granularity} | {len(weights)} | {row['mk_vs_ours']['tensors']} | "  # type: ignore[index]
          f"{row['mk_vs_ours']['max_abs']:.2e} | {row['ours_vs_ref64']['max_abs']:.2e} | "  # type: ignore[index]
          f"{row['mk_vs_ref64']['max_abs']:.2e} | {row['ours_vs_base']:.3f} | {ours_s:.1f} / {mk_s:.1f} |", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mk-venv", type=Path, default=Path("/tmp/mk-venv"))
    ap.add_argument("--pool", type=Path, default=Path("runs/quick"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/vs_mergekit_layers.json"))
    ap.add_argument("--tol", type=float, default=1e-6,
                    help="largest max |mergekit − ours| that counts as agreement (fp32 rounding)")
    a = ap.parse_args()
    mk_yaml, mk_py = a.mk_venv / "bin" / "mergekit-yaml", a.mk_venv / "bin" / "python"
    if not mk_yaml.exists():
        sys.exit(f"error: {mk_yaml} not found: install mergekit in its own venv (see bench/vs_mergekit.py)")
    pool_dir = (ROOT / a.pool).resolve()
    missing = [n for n in QUICK if not (pool_dir / "vectors" / f"{n}.safetensors").exists()
               or not (pool_dir / "cpt" / n / "config.json").exists()]
    if missing:
        sys.exit(f"error: quick pool lacks {missing}: run `optimer demo --quick --workdir {a.pool}`")
    torch.set_num_threads(1)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    mk_version = subprocess.run([str(mk_py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip()
    import transformers

    from optimer_lib.data import assets_dir

    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, mergekit {mk_version}; {time.strftime('%Y-%m-%d')}\n\n"
          "| case | granularity | weights | tensors | max abs mergekit − ours | ours − float64 ref | "
          "mergekit − float64 ref | max abs ours − base | export s / mergekit s |\n" + "|---" * 9 + "|")
    tmp = Path(tempfile.mkdtemp(prefix="vs-mergekit-layers-"))
    quick = {n: Path(a.pool) / "cpt" / n for n in QUICK}  # relative, as the vectors' sources are
    rows = [run_case(f"quick {g}{' partial' if p else ''}", assets_dir() / "base", quick, pool_dir / "vectors", g, p,
                     seed, mk_yaml, tmp, env)
            for seed, (g, p) in enumerate([("layer-groups:2", False), ("layer-groups:3", False),
                                           ("layer-groups:4", False), ("layer-groups:4", True)])]
    for arch, layers, g in (("llama_untied", 6, "layer-groups:4"), ("gpt2", 3, "layer-groups:3")):
        base, tuned = tiny_world(tmp / arch, arch, layers, ("ja", "zh", "code"))
        rows.append(run_case(f"tiny {arch} ({layers} blocks)", base, tuned, tmp / arch / "vectors", g, False,
                             len(rows), mk_yaml, tmp, env))
    worst = max(float(r["mk_vs_ours"]["max_abs"]) for r in rows)  # type: ignore[index]
    names_ok = all(not r["mk_vs_ours"]["only_first"] and not r["mk_vs_ours"]["only_second"]  # type: ignore[index]
                   for r in rows)
    print(f"\nlargest max |mergekit − ours| over all cases: {worst:.2e} (tolerance {a.tol:g}); "
          f"same tensor names in every case: {names_ok}")
    a.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "mergekit": mk_version,
                                 "torch": torch.__version__, "transformers": transformers.__version__,
                                 "tolerance": a.tol, "worst_mk_vs_ours": worst, "same_names": names_ok,
                                 "cases": rows}, indent=1) + "\n")
    print(f"wrote {a.out}")
    shutil.rmtree(tmp, ignore_errors=True)
    if worst > a.tol or not names_ok:
        sys.exit("error: mergekit and OptiMer disagree on a per-layer-group merge (see the table)")


if __name__ == "__main__":
    main()
