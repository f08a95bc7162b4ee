"""Tokenizers: train (rustbpe, neox, our own python BPE), encode/decode, export to Hugging Face, evaluate.

    from nanoforge.tokenizer import Tokenizer
    tok = Tokenizer.load("de32k")
    ids = tok.encode("Grüß Gott!", bos=True)
"""

from nanoforge.tokenizer.core import BOS, NANOCHAT_PATTERN, SPECIAL_TOKENS, Tokenizer, TokenizerError

__all__ = ["BOS", "NANOCHAT_PATTERN", "SPECIAL_TOKENS", "Tokenizer", "TokenizerError"]
