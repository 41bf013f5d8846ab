"""LMDeploy's `lmdeploy.vl.constants`."""

from ..models.family import ModelFamily

IMAGE_TOKEN = ModelFamily.image_placeholder  # "<image>"
