"""CQ-DINO: category queries for vast-vocabulary object detection, as a Detectron2 project."""

__version__ = "0.1.0"
