"""mmserver: a fast multimodal (InternVL) inference server."""

from .pipeline import IMAGE_TOKEN, GenerationConfig, Pipeline, Response, pipeline

__all__ = ["pipeline", "Pipeline", "GenerationConfig", "Response", "IMAGE_TOKEN"]
__version__ = "0.1.0"
