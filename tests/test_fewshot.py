import pytest
import torch

from peft_minimal import fewshot, ia3
from peft_minimal.data import TextData

LABELS = [5, 17, 42]


def direct(model, ids: list[int]) -> torch.Tensor:
    """Label log-likelihoods from one plain forward pass over the whole prompt."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return logits.log_softmax(-1)[LABELS]


def test_scores_match_a_direct_computation_with_and_without_prefix(tiny_llama):
    prefix = [3, 9, 27, 81, 43, 29]
    queries = [[11, 12, 13], [14, 15, 16, 17, 18, 19, 20], [21]]
    cached = fewshot.score(tiny_llama, prefix, queries, LABELS, pad_id=0, batch_size=2)
    plain = fewshot.score(tiny_llama, [], [prefix + q for q in queries], LABELS, pad_id=0)
    expected = torch.stack([direct(tiny_llama, prefix + q) for q in queries])
    assert cached.shape == (3, 3)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)


def test_padding_and_batch_company_do_not_change_a_score(tiny_llama):
    short = [7, 8, 9]
    alone = fewshot.score(tiny_llama, [1, 2], [short], LABELS, pad_id=0)
    padded = fewshot.score(tiny_llama, [1, 2], [short, list(range(30, 60))], LABELS, pad_id=99)
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)


def test_training_changes_only_the_ia3_vectors(tiny_llama):
    model = ia3.add_ia3(tiny_llama, ia3.IA3Config.for_model(tiny_llama))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = [[4, 5, 6], [7, 8, 9, 10], [11, 12]]
    losses = fewshot.train_ia3(model, rows, [0, 1, 2], LABELS, pad_id=0,
                               config=fewshot.FewShotConfig(steps=20, lr=0.1, batch_size=3))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("ia3_l" in name for name in changed)
    assert len(changed) == 3 * 2  # k_proj, v_proj, down_proj in both layers
    assert losses[-1] < losses[0]


def test_per_class_draws_n_of_every_class_by_seed():
    data = TextData([f"t{i}" for i in range(30)], [i % 3 for i in range(30)], ["a", "b", "c"])
    one = fewshot.per_class(data, 2, seed=0)
    assert sorted(one.labels) == [0, 0, 1, 1, 2, 2]
    assert fewshot.per_class(data, 2, seed=0) == one
    assert fewshot.per_class(data, 2, seed=1).texts != one.texts


def test_prompts_and_titles():
    config = fewshot.FewShotConfig(instruction="Sort.\n\n", template="H: {text}\nT:")
    demos = TextData(["up", "down"], [1, 0], ["x", "y"])
    assert fewshot.build_prompt(config, demos, "q") == ("Sort.\n\nH: up\nT: y\n\nH: down\nT: x\n\n", "H: q\nT:")
    assert fewshot.build_prompt(config, None, "q") == ("Sort.\n\n", "H: q\nT:")
    assert fewshot.titles(TextData(["Title\n\nBody text", "Only"], [0, 1], ["a", "b"])).texts == ["Title", "Only"]


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text.strip()]}


def test_label_words_must_be_single_tokens():
    assert fewshot.label_token_ids(CharTokenizer(), ["a", "b"]) == [97, 98]
    with pytest.raises(ValueError, match="one token"):
        fewshot.label_token_ids(CharTokenizer(), ["a", "bc"])
    with pytest.raises(ValueError, match="method"):
        fewshot.run_fewshot("gpt", fewshot.FewShotConfig())
