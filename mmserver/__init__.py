"""mmserver: a fast multimodal (InternVL) inference server."""

from .pipeline import IMAGE_TOKEN, GenerationConfig, Pipeline, Response, Session, StreamResponse, pipeline

__all__ = ["pipeline", "Pipeline", "GenerationConfig", "Response", "StreamResponse", "Session", "IMAGE_TOKEN"]
__version__ = "0.1.0"
