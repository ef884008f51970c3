"""CDSP: class-driven scribble promotion for scribble-supervised semantic segmentation.

The method in plain PyTorch. This package imports neither Ray nor FastAPI.
"""

__version__ = "0.1.0"
