"""RecLM: recommendation instruction tuning.

A fine-tuned language model writes user and item profiles that are embedded and fused into
collaborative-filtering recommenders (Jiang et al., ACL 2025).
"""

__version__ = "0.1.0"
