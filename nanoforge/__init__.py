"""nanoforge: from raw text to your own small language model."""
__version__ = "0.1.0"
