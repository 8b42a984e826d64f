"""reap: quantize, verify, serve, evaluate and publish compressed Mixture-of-Experts LLMs."""

__version__ = "0.1.0"
