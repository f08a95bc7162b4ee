"""Corpus handling: reading documents, downloading shards, importing text, token shards and the loader."""
