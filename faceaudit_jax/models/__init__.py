"""Flax models. ``resnet`` holds the classifiers and the reusable backbone."""

from faceaudit_jax.models.resnet import (
    MODEL_NAMES,
    ResNetBackbone,
    ResNetClassifier,
    build_backbone,
    build_model,
    classifier_fns,
    init_variables,
)

__all__ = [
    "MODEL_NAMES",
    "ResNetBackbone",
    "ResNetClassifier",
    "build_backbone",
    "build_model",
    "classifier_fns",
    "init_variables",
]
