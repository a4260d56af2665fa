"""Tunehouse: self-hosted fine-tuning and inference with an OpenAI-compatible API."""

__version__ = "0.1.0"
