"""mmserver: a fast multimodal (InternVL) inference server."""

from .messages import ChatTemplateConfig, EngineOptions, PytorchEngineConfig, TurbomindEngineConfig, VisionConfig
from .pipeline import IMAGE_TOKEN, GenerationConfig, Pipeline, Response, Session, StreamResponse, pipeline

__all__ = ["pipeline", "Pipeline", "GenerationConfig", "Response", "StreamResponse", "Session", "IMAGE_TOKEN",
           "TurbomindEngineConfig", "PytorchEngineConfig", "EngineOptions", "ChatTemplateConfig", "VisionConfig"]
__version__ = "0.1.0"
