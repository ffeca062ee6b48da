"""Encoders: text (sentence-transformers, static distilled), image (CLIP family, pixel statistics)."""
