"""Small trained class-conditional DiTs on 16x16 digits, shipped so step-caching demos run offline.

Two models share one architecture: ``"ddpm"`` (``dit_digits``, DDPM epsilon prediction, the default;
sampled with ``ddim`` / ``dpm``) and ``"flow"`` (``dit_digits_flow``, flow matching; sampled with
``flow-euler``). ``load_model(model="flow")`` picks the second.

Everything here works without network access: the data ship with scikit-learn and the weights ship in
``weights/``. ``import stepcache.reference`` only imports torch; diffusers, scikit-learn and safetensors are
imported when first needed.

Public API:
    load_model, load_classifier, load_digits, make_scheduler, sample, default_scheduler,
    ReferencePipeline, shipped_calibration, calibrate_reference,
    NUM_CLASSES, IMAGE_SIZE, NULL_CLASS, DEFAULT_GUIDANCE_SCALE, MODEL_NAMES, MODEL_SCHEDULERS,
    SCHEDULER_NAMES, ReferenceWeightsError.
"""

from __future__ import annotations

from stepcache.reference._classifier import DigitClassifier, load_classifier
from stepcache.reference._data import IMAGE_SIZE, NUM_CLASSES, load_digits
from stepcache.reference._model import (
    DEFAULT_GUIDANCE_SCALE,
    MODEL_NAMES,
    MODEL_SCHEDULERS,
    NULL_CLASS,
    SCHEDULER_NAMES,
    check_scheduler_fits,
    default_scheduler,
    load_model,
    load_model_metadata,
    make_scheduler,
    model_key,
    sample,
)
from stepcache.reference._weights import DEFAULT_WEIGHTS_DIR, ReferenceWeightsError
from stepcache.reference.pipeline import ReferencePipeline, calibrate_reference, shipped_calibration

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_WEIGHTS_DIR",
    "IMAGE_SIZE",
    "MODEL_NAMES",
    "MODEL_SCHEDULERS",
    "NULL_CLASS",
    "NUM_CLASSES",
    "SCHEDULER_NAMES",
    "DigitClassifier",
    "ReferencePipeline",
    "ReferenceWeightsError",
    "calibrate_reference",
    "check_scheduler_fits",
    "default_scheduler",
    "load_classifier",
    "load_digits",
    "load_model",
    "load_model_metadata",
    "make_scheduler",
    "model_key",
    "sample",
    "shipped_calibration",
]
