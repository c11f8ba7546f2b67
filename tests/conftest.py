"""Tiny models built from configs, so most tests run in milliseconds and need no weights."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM


@pytest.fixture
def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 100, (4, 12), generator=g)


@pytest.fixture
def ids():
    """Three rows of seven token ids, for the padding cases of the prefix and prompt tests."""
    return torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(1))
