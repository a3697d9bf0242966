"""Model and tokenizer loading (embedded default, tiny random, local directory, hub id)."""

from ppolm.models.load import EMBEDDED, available_models, ensure_embedded, load_model, load_tokenizer, resolve

__all__ = ["EMBEDDED", "available_models", "ensure_embedded", "load_model", "load_tokenizer", "resolve"]
