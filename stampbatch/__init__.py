"""stampbatch: train CNNs on astronomical image stamps and score survey-scale candidate sets."""

__version__ = "0.1.0"
