import pytest
from torch import nn

from peft_minimal.layers import count_parameters, find_target_modules, freeze_base, matches_target


def test_list_entry_matches_exact_name_or_dotted_suffix():
    assert matches_target("query", ["query"])
    assert matches_target("bert.encoder.layer.0.attention.self.query", ["query"])
    assert not matches_target("bert.encoder.layer.0.attention.self.myquery", ["query"])
    assert matches_target("a.attention.output.dense", ["attention.output.dense"])
    assert not matches_target("a.output.dense", ["attention.output.dense"])


def test_string_is_full_regex_match():
    assert matches_target("layer.0.attention.self.query", r".*\.query")
    assert not matches_target("layer.0.attention.self.query.x", r".*\.query")


def test_find_targets_in_bert(tiny_bert):
    names = [n for n, _ in find_target_modules(tiny_bert, ["query", "value"])]
    assert len(names) == 4 and all(n.endswith(("query", "value")) for n in names)
    # BERT has two "output.dense": the suffix rule catches both (the IA3 pitfall)
    assert len(find_target_modules(tiny_bert, ["output.dense"])) == 4


def test_no_match_is_a_clear_error(tiny_bert):
    with pytest.raises(ValueError, match="matched no module.*query"):
        find_target_modules(tiny_bert, ["qkv"])
    with pytest.raises(ValueError, match="empty"):
        find_target_modules(tiny_bert, [])


def test_freeze_base_keeps_adapters_and_head(tiny_bert):
    freeze_base(tiny_bert, ("lora_",), ["classifier"])
    trainable = {n for n, p in tiny_bert.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}


def test_count_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad = False
    assert count_parameters(model) == (4 + 8 + 2, 16 + 10)
