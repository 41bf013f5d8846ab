"""mmserver: a fast multimodal (InternVL) inference server."""

from .messages import ChatTemplateConfig, EngineOptions, PytorchEngineConfig, TurbomindEngineConfig, VisionConfig
from .pipeline import IMAGE_TOKEN, GenerationConfig, Pipeline, Response, Session, StreamResponse, Video, pipeline

__all__ = ["pipeline", "Pipeline", "GenerationConfig", "Response", "StreamResponse", "Session", "Video", "IMAGE_TOKEN",
           "TurbomindEngineConfig", "PytorchEngineConfig", "EngineOptions", "ChatTemplateConfig", "VisionConfig"]
__version__ = "0.1.0"
