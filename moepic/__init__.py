"""moepic: exact Mixture-of-Experts inference with routed experts offloaded to host memory."""

__version__ = "0.1.0"
