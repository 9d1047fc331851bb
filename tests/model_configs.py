"""Configs of real model shapes, for tests that price or count a model without building it."""

from transformers import LlamaConfig


def llama3_8b_config() -> LlamaConfig:
    """Llama-3-8B's shape (8,030,261,248 parameters)."""
    return LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
    )
