"""Export: a loadable HF checkpoint equal to the resident model, with model card and mergekit recipe."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from optimer_lib.checkpoints.models import load_model, load_tokenizer
from optimer_lib.checkpoints.vectors import extract_vector, load_vector, save_vector
from optimer_lib.errors import OptimerError
from optimer_lib.merging.export import export_merged
from optimer_lib.merging.resident import ResidentMerger


def _merged(tiny_pool, arch, tmp_path, n=2, instruction=False):
    base_dir, tuned = tiny_pool(arch, n + int(instruction))
    vecs = [load_vector(save_vector(extract_vector(base_dir, d, name=f"v{i}", tokens_trained=100 * (i + 1)),
                                    tmp_path / f"v{i}.safetensors")) for i, d in enumerate(tuned[:n])]
    it = extract_vector(base_dir, tuned[n], name="it") if instruction else None
    model = load_model(base_dir)
    merger = ResidentMerger(model, vecs, instruction=it, instruction_weight=0.5)
    weights = {f"v{i}": 0.25 * (i + 1) for i in range(n)}
    merger.set_weights(weights)
    return base_dir, tuned, vecs, it, merger, weights


def test_export_loads_and_matches(tiny_pool, arch, tmp_path):
    base_dir, tuned, vecs, _, merger, weights = _merged(tiny_pool, arch, tmp_path)
    tok = load_tokenizer(base_dir)
    out = export_merged(merger.model, tok, tmp_path / "out" / "merged", base_path=str(base_dir), vectors=vecs,
                        weights=weights, scores={"dev_loss": 3.5, "math_acc": 0.25})
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]  # no temp dirs left
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.tensor([tok("the quick brown fox 12 + 35")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, merger.model(ids).logits, atol=1e-6, rtol=0)
    if loaded.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert load_tokenizer(out).get_vocab() == tok.get_vocab()
    cfg = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert cfg["merge_method"] == "task_arithmetic" and cfg["base_model"] == str(base_dir)
    assert [m["model"] for m in cfg["models"]] == [str(d) for d in tuned]
    assert [m["parameters"]["weight"] for m in cfg["models"]] == [0.25, 0.5]
    assert cfg["dtype"] == "float32"
    card = (out / "README.md").read_text()
    for s in ("| v0 |", "| v1 |", "0.25", "task_arithmetic", "dev_loss", "optimer merge --base",
              f"--vector {tmp_path / 'v1.safetensors'}=0.5", "--method optimer", str(base_dir), "| 200 |"):
        assert s in card, s


def test_export_instruction_average_and_overwrite(tiny_pool, tmp_path):
    base_dir, tuned, vecs, it, merger, weights = _merged(tiny_pool, "llama", tmp_path, instruction=True)
    out = tmp_path / "m"
    export_merged(merger.model, None, out, base_path=str(base_dir), vectors=vecs, weights=weights,
                  instruction=it, instruction_weight=0.5)
    cfg = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert cfg["models"][-1] == {"model": str(tuned[2]), "parameters": {"weight": 0.5}}
    assert "(instruction)" in (out / "README.md").read_text()
    with pytest.raises(OptimerError, match="--force"):
        export_merged(merger.model, None, out, base_path=str(base_dir), vectors=vecs, weights=weights)
    export_merged(merger.model, None, out, base_path=str(base_dir), vectors=vecs, weights=weights,
                  method="average", overwrite=True)
    cfg = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert [m["parameters"]["weight"] for m in cfg["models"]] == [0.5, 0.5]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    export_merged(merger.model, None, tmp_path / "t", base_path=str(base_dir), vectors=vecs, weights=weights,
                  method="ties", method_params={"density": 0.3})
    cfg = yaml.safe_load((tmp_path / "t" / "mergekit.yaml").read_text())
    assert cfg["merge_method"] == "ties" and cfg["models"][0]["parameters"]["density"] == 0.3
    assert "--method ties --param density=0.3 --out" in (tmp_path / "t" / "README.md").read_text()


def test_failed_export_leaves_previous_intact(tiny_pool, tmp_path):
    base_dir, _, vecs, _, merger, weights = _merged(tiny_pool, "llama_untied", tmp_path)
    out = export_merged(merger.model, None, tmp_path / "m", base_path=str(base_dir), vectors=vecs,
                        weights=weights)
    before = sorted(p.name for p in out.iterdir())

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

        def parameters(self):
            return iter(())

    with pytest.raises(OSError, match="disk full"):
        export_merged(Broken(), None, out, base_path=str(base_dir), vectors=vecs, weights=weights,
                      overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(OptimerError, match=r"no weight given for vector\(s\) \['v1'\]"):
        export_merged(merger.model, None, tmp_path / "x", base_path=str(base_dir), vectors=vecs,
                      weights={"v0": 1.0})
