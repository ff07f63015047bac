"""A small class-conditional pixel-space Flux DiT trained on procedural scenes, for measuring fidelity.

    from chipmunk_compile.reference_model import load_reference_model, sample, classify
    transformer, conditioner, config = load_reference_model("cuda", torch.bfloat16)
    images = sample(transformer, conditioner, class_ids=[0, 1, 2, 3], seed=0, num_steps=50)
"""

from chipmunk_compile.reference_model.data import (
    CLASS_NAMES,
    IMAGE_SIZE,
    NUM_CLASSES,
    SceneClassifier,
    classifier_accuracy,
    classify,
    load_classifier,
    make_balanced_batch,
    make_batch,
    random_class_ids,
)
from chipmunk_compile.reference_model.model import (
    DEFAULT_CONFIG,
    TEXT_TOKENS,
    WEIGHTS_DIR,
    ClassConditioner,
    ReferenceConfig,
    build_transformer,
    image_ids,
    load_reference_config,
    load_reference_model,
    pack,
    save_reference_model,
    text_ids,
    unpack,
    weights_available,
)
from chipmunk_compile.reference_model.sampling import initial_noise, make_scheduler, sample, save_grid

__all__ = [
    "CLASS_NAMES",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "SceneClassifier",
    "classifier_accuracy",
    "classify",
    "load_classifier",
    "make_balanced_batch",
    "make_batch",
    "random_class_ids",
    "DEFAULT_CONFIG",
    "TEXT_TOKENS",
    "WEIGHTS_DIR",
    "ClassConditioner",
    "ReferenceConfig",
    "build_transformer",
    "image_ids",
    "load_reference_config",
    "load_reference_model",
    "pack",
    "save_reference_model",
    "text_ids",
    "unpack",
    "weights_available",
    "initial_noise",
    "make_scheduler",
    "sample",
    "save_grid",
]
