from conftest import make_model, perturbed

from optimer_lib.checkpoints.models import load_model, load_tokenizer


def test_pool_loads(tiny_pool, arch):
    base_dir, tuned = tiny_pool(arch, 2)
    m = load_model(base_dir)
    t = load_model(tuned[0])
    tok = load_tokenizer(base_dir)
    assert tok.decode(tok("the fox 12 + 35")["input_ids"]) == "the fox 12 + 35"
    diff = sum((a - b).abs().sum().item() for a, b in zip(m.parameters(), t.parameters(), strict=True))
    assert diff > 0


def test_perturbed_is_a_copy():
    m = make_model("llama")
    p = perturbed(m, 0.1, 1)
    assert not (next(m.parameters()) == next(p.parameters())).all()
