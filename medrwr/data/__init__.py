"""Training-data pipelines: stage-2 MCQ synthesis from image–caption pairs (``synth``) and a knowledge base
from MCQ explanations (``kb``). See docs/data-pipelines.md."""
