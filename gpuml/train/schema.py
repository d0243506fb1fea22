"""The config schema: every section and layer type as a table of typed fields.

A field is (types, default, choices). REQUIRED marks a field without default. Sections nest. The
validator in config.py walks these tables; unknown keys and wrong types are errors naming the
key path and a "did you mean" suggestion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REQUIRED = object()


@dataclass(frozen=True)
class Field:
    types: tuple[str, ...]  # among: int, float, bool, str, null, list[int], list[str], pair, list[dict]
    default: Any = REQUIRED
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None  # inclusive lower bound for numbers
    exclusive_min: bool = False
    doc: str = ""
    pattern: str | None = None  # strings accepted besides `choices` (a full-match regex)
    maximum: float | None = None  # inclusive upper bound for numbers
    exclusive_max: bool = False


def F(types: str, default: Any = REQUIRED, choices: tuple[Any, ...] | None = None,
      minimum: float | None = None, exclusive_min: bool = False, doc: str = "",
      pattern: str | None = None, maximum: float | None = None, exclusive_max: bool = False) -> Field:
    return Field(tuple(types.split("|")), default, choices, minimum, exclusive_min, doc, pattern,
                 maximum, exclusive_max)


ACTIVATION_CHOICES = ("relu", "tanh", "sigmoid", None)

AUGMENT: dict[str, Any] = {
    "shift": F("int", 0, minimum=0, doc="max random shift in pixels (each axis)"),
    "rotate": F("float", 0.0, minimum=0, doc="max random rotation in degrees"),
    "scale": F("float", 0.0, minimum=0, maximum=1, exclusive_max=True,
               doc="max relative zoom, e.g. 0.1 for 0.9x..1.1x (1 would allow 0x)"),
    "hflip": F("bool", False, doc="random horizontal flips (off by default: wrong for digits)"),
}

DATA: dict[str, Any] = {
    "dataset": F("str", "fashion_mnist", choices=("fashion_mnist", "mnist", "npz", "idx"),
                 doc="a registered dataset, or your own: npz (data.path) or idx (data.paths)"),
    "root": F("str|null", None, doc="folder holding the IDX files; searched first"),
    "path": F("str|null", None, doc="npz: a .npz file holding x_train, y_train, x_test, y_test"),
    "paths": {k: F("str|null", None, doc=f"idx: the {k.replace('_', ' ')} IDX file")
              for k in ("train_images", "train_labels", "test_images", "test_labels")},
    "classes": F("list[str]|null", None, doc="npz/idx: class names (default: the npz's classes, else 0..k-1)"),
    # 1/12: 5,000 of Fashion-MNIST's 60,000 as before, and a share of any data.limit or npz (a
    # count of 5000 refused every dataset under 5,001 samples unless val_split was set)
    "val_split": F("int|float", 0.0833333333, minimum=0, doc="validation samples (int) or fraction (float < 1)"),
    "limit": F("int|null", None, minimum=1, doc="use only the first N training samples"),
    "normalize": F("bool", True, doc="subtract the training mean, divide by its std"),
    "download": F("bool", True, doc="download from the canonical mirrors when not found"),
    "augment": AUGMENT,
}

LAYERS: dict[str, dict[str, Field]] = {
    "dense": {
        "units": F("int", minimum=1),
        "activation": F("str|null", None, choices=ACTIVATION_CHOICES),
        "use_bias": F("bool", True),
        "init": F("str|null", None, choices=("he", "glorot", None)),
    },
    "conv2d": {
        "filters": F("int", minimum=1),
        "kernel": F("int|pair", minimum=1),
        "stride": F("int|pair", 1, minimum=1),
        "padding": F("int|pair|str", 0, minimum=0, doc="pixels, or 'same' / 'valid'"),
        "activation": F("str|null", None, choices=ACTIVATION_CHOICES),
        "use_bias": F("bool", True),
        "init": F("str|null", None, choices=("he", "glorot", None)),
    },
    "maxpool2d": {
        "size": F("int|pair", minimum=1),
        "stride": F("int|pair|null", None, minimum=1),
        "padding": F("int|pair", 0, minimum=0),
    },
    "flatten": {},
    "relu": {},
    "tanh": {},
    "sigmoid": {},
    "dropout": {"rate": F("float", minimum=0, maximum=1, exclusive_max=True)},
}
LAYERS["avgpool2d"] = dict(LAYERS["maxpool2d"])
for _spec in LAYERS.values():
    _spec["name"] = F("str|null", None, doc="layer name in the summary and checkpoints")

MODEL: dict[str, Any] = {
    "input_shape": F("list[int]|null", None, doc="(channels, height, width); default: the dataset's"),
    "layers": F("list[dict]"),
    "init_from": F("str|null", None, doc="fine-tuning: weights by layer name from a run folder, "
                   "weights .npz, checkpoint or .safetensors"),
    "init_skip": F("list[str]", [], doc="layers init_from leaves freshly initialised (a new head)"),
    "freeze": F("list[str]", [], doc="layers whose parameters are not trained"),
}

LOSS: dict[str, Any] = {
    "name": F("str", "softmax_cross_entropy", choices=("softmax_cross_entropy", "mse")),
    "label_smoothing": F("float", 0.0, minimum=0, maximum=1, exclusive_max=True),
}

OPTIMIZER: dict[str, Any] = {
    "name": F("str", "adam", choices=("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop")),
    "lr": F("float", 1e-3, minimum=0, exclusive_min=True),
    "momentum": F("float", 0.9, minimum=0, doc="momentum / nesterov"),
    "beta1": F("float", 0.9, minimum=0, maximum=1, exclusive_max=True),
    "beta2": F("float", 0.999, minimum=0, maximum=1, exclusive_max=True),
    "eps": F("float", 1e-8, minimum=0, exclusive_min=True),
    "alpha": F("float", 0.99, minimum=0, maximum=1, doc="rmsprop smoothing constant"),
    "weight_decay": F("float", 0.0, minimum=0),
}

SCHEDULE: dict[str, Any] = {
    "name": F("str", "constant",
              choices=("constant", "step", "multistep", "exponential", "cosine", "onecycle")),
    "step_size": F("int", 1, minimum=1, doc="step: epochs between decays"),
    "milestones": F("list[int]", [], doc="multistep: epochs at which lr *= gamma"),
    "gamma": F("float", 0.1, minimum=0),
    "min_lr": F("float", 0.0, minimum=0, doc="cosine: final lr"),
    "max_lr": F("float|null", None, minimum=0, doc="onecycle: peak lr (default optimizer.lr)"),
    "pct_start": F("float", 0.3, minimum=0, maximum=1, doc="onecycle: share of the steps spent rising"),
    "div_factor": F("float", 25.0, minimum=0, exclusive_min=True),
    "final_div_factor": F("float", 1e4, minimum=0, exclusive_min=True),
    "warmup_epochs": F("float", 0.0, minimum=0, doc="linear warm-up length in epochs"),
    "warmup_start": F("float", 0.0, minimum=0, doc="warm-up starts at lr * warmup_start"),
}

EARLY_STOPPING: dict[str, Any] = {
    "enabled": F("bool", False),
    "monitor": F("str", "val_loss"),
    "mode": F("str", "auto", choices=("auto", "min", "max")),
    "patience": F("int", 5, minimum=0),
    "min_delta": F("float", 0.0, minimum=0),
    "restore_best": F("bool", True),
}

# Mid-epoch checkpoints (on top of the one after every epoch), so a long epoch is not lost.
CHECKPOINT_EVERY: dict[str, Any] = {
    "steps": F("int|null", None, minimum=1, doc="also every N global steps (null: off)"),
    "minutes": F("float|null", 10.0, minimum=0, exclusive_min=True,
                 doc="also when this many minutes passed since the last checkpoint (null: off)"),
}

TRAINER: dict[str, Any] = {
    "epochs": F("int", 10, minimum=1),
    "batch_size": F("int", 32, minimum=1),
    "eval_batch_size": F("int", 1000, minimum=1),
    "drop_last": F("bool", False, doc="skip the last partial training batch"),
    "log_every": F("int", 50, minimum=1, doc="steps between loss read-backs (progress bar)"),
    "tensorboard": F("bool", False, doc="TensorBoard event files in RUN_DIR/tensorboard: every log_every "
                     "steps and each epoch"),
    "progress": F("bool|null", None, doc="progress bar; default: when stderr is a terminal"),
    "grad_clip_norm": F("float|null", None, minimum=0, exclusive_min=True),
    "cuda_graph": F("str|bool", "auto", choices=("auto", "on", "off", True, False),
                    doc="capture the CUDA training and evaluation steps as CUDA graphs and replay them "
                        "(auto: on with a CUDA device; on: required, an error where it cannot be; off: eager)"),
    "keep_checkpoints": F("int", 2, minimum=1, doc="how many last step checkpoints to keep"),
    "checkpoint_every": CHECKPOINT_EVERY,
    "monitor": F("str", "auto", doc="metric for the best checkpoint (auto: val_accuracy, else train_accuracy)"),
    "monitor_mode": F("str", "auto", choices=("auto", "min", "max")),
    "early_stopping": EARLY_STOPPING,
}

ROOT: dict[str, Any] = {
    "name": F("str", "run"),
    "device": F("str", "auto", choices=("auto", "cuda", "cpu"), pattern=r"cuda:\d+",
                doc="auto (CUDA when CuPy sees a GPU, else CPU), cpu, cuda (the current GPU) or cuda:N (GPU N)"),
    "seed": F("int", 0, minimum=0),
    "dtype": F("str", "float32", choices=("float32", "float64")),
    "precision": F("str", "fp32", choices=("fp32", "tf32", "bf16"),
                   doc="operands of the Dense layers' matrix products: fp32 exact; tf32 / bf16 rounded to "
                       "TF32 / BF16 (tensor cores on a GPU, sm_80 or newer), FP32 sums, FP32 weights and "
                       "optimizer state; the CPU rounds the same way"),
    "data": DATA,
    "model": MODEL,
    "loss": LOSS,
    "optimizer": OPTIMIZER,
    "schedule": SCHEDULE,
    "trainer": TRAINER,
}
