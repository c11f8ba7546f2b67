import torch

from peft_minimal.models import load_encoder


def test_encoder_is_minilm_with_seeded_fresh_heads():
    a, tokenizer = load_encoder(num_labels=4, seed=0)
    b, _ = load_encoder(num_labels=4, seed=0)
    c, _ = load_encoder(num_labels=4, seed=1)
    assert sum(p.numel() for p in a.bert.parameters()) == 22_713_216
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    a.bert.embeddings.word_embeddings.weight.data.zero_()  # copies are independent
    assert b.bert.embeddings.word_embeddings.weight.abs().sum() > 0
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id
