"""MedRwR: multimodal medical reasoning-with-retrieval.

Importing the package is cheap: no torch, no transformers. Heavy layers are imported on use.
"""

from medrwr.protocol import ParsedCompletion, Segment, extract_choice, parse_completion

__version__ = "0.1.0"

__all__ = ["ParsedCompletion", "Segment", "__version__", "extract_choice", "parse_completion"]
