"""Hugging Face interoperability: export to and import from transformers' Llama format."""
