"""selftrain: self-training for unsupervised domain adaptation (ST, CBST, CBST-SP)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
