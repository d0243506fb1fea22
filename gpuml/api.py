"""The Keras-like Python API: `gpuml.Sequential` with compile / fit / evaluate / predict / save,
and `gpuml.load_model`. It runs the one Trainer the CLI runs: `compile` and `fit` arguments
become the same resolved config (gpuml.train.config), so errors are the CLI's one-line
ConfigErrors, raised as exceptions, and a `fit(run_dir=...)` leaves a run folder that `gpuml
eval / predict / export / plot / train --resume` work on.

Inputs. `x` is (N, H, W) (one channel), (N, C, H, W) or (N, H, W, C) with C 1 or 3, or (N,
features). gpuml trains on 8-bit values, as its CLI datasets are: uint8 (or any integer type)
holds 0..255; a float array must hold values in [0, 1] that are multiples of 1/255 (such as
`x_uint8 / 255`) and is refused otherwise, never rounded silently (gpuml.data.user). As in the
CLI, values are then scaled to [0, 1] and, with `normalize=True` (the default), standardised by
the mean and std of the training pixels; evaluate and predict apply the same rule and the
statistics of the last fit. `y` holds integer class labels of any integer dtype, 0..classes-1
where classes is the size of the model's output.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gpuml import distributed
from gpuml.errors import ConfigError, DataError, GpumlError
from gpuml.nn import model as _nn_model
from gpuml.nn.layers import Layer, Shape

OptionSpec = str | Mapping[str, Any]


class History:
    """What fit returns: `history` maps Keras's names (loss, accuracy, val_loss, val_accuracy,
    lr) to one value per epoch; `run_dir` is the run folder (None when fit used a temporary
    one) and `summary` the run's summary.json record."""

    def __init__(self, rows: list[dict[str, Any]], run_dir: Path | None, summary: dict[str, Any]) -> None:
        self.epoch = [r["epoch"] - 1 for r in rows]
        self.history: dict[str, list[float]] = {}
        for r in rows:
            for k, v in keras_logs(r).items():
                self.history.setdefault(k, []).append(v)
        self.run_dir = run_dir
        self.summary = summary


def keras_logs(row: Mapping[str, Any]) -> dict[str, float]:
    """A trainer metrics row under Keras's names (train_loss -> loss, ...)."""
    names = {"train_loss": "loss", "train_accuracy": "accuracy", "val_loss": "val_loss",
             "val_accuracy": "val_accuracy", "lr": "lr"}
    return {names[k]: v for k, v in row.items() if k in names}


class Sequential(_nn_model.Sequential):
    """gpuml.nn.Sequential plus Keras's compile / fit / evaluate / predict / save. Layers need
    no input shape: the model is built from x's shape at the first fit, evaluate or predict."""

    def __init__(self, layers: Iterable[Layer] = ()) -> None:
        super().__init__(list(layers))
        self._optimizer: OptionSpec = "adam"
        self._loss: OptionSpec = "softmax_cross_entropy"
        self._compiled = False
        self._cfg: dict[str, Any] | None = None   # the resolved config of the last fit or load
        self._norm = (0.0, 1.0)                   # training pixel mean/std in [0, 1] units
        self._classes: list[str] | None = None

    def add(self, layer: Layer) -> None:
        if self.built:
            raise GpumlError("add(): the model is already built; make a new Sequential")
        self.layers.append(layer)
        self._name_layers()

    # ------------------------------------------------------------------ compile / fit
    def compile(self, optimizer: OptionSpec = "adam", loss: OptionSpec = "softmax_cross_entropy",
                metrics: Iterable[str] | None = None) -> None:
        """`optimizer`: a name (sgd, momentum, nesterov, adam, adamw, rmsprop) or a mapping with
        the config's optimizer keys ({"name": "adam", "lr": 3e-3, "weight_decay": ...}); `loss`:
        softmax_cross_entropy or mse, or {"name": ..., "label_smoothing": ...}. Accuracy is
        always reported, so `metrics` may only name it. Checked here, with the config's errors."""
        for m in metrics or ():
            if m not in ("accuracy", "acc"):
                raise ConfigError(f"compile: metrics: {m!r} is not available (loss and accuracy always are)")
        from gpuml.train.config import validate

        validate({"optimizer": copy.deepcopy(optimizer), "loss": copy.deepcopy(loss),
                  "model": {"layers": [{"type": "flatten"}]}}, "compile")
        self._optimizer, self._loss, self._compiled = copy.deepcopy(optimizer), copy.deepcopy(loss), True

    def fit(self, x: Any, y: Any, *, epochs: int = 1, batch_size: int = 32,
            validation_data: tuple[Any, Any] | None = None, validation_split: float = 0.0,
            device: str = "auto", dtype: str = "float32", precision: str = "fp32", seed: int = 0,
            normalize: bool = True,
            schedule: OptionSpec | None = None, early_stopping: Mapping[str, Any] | bool | None = None,
            grad_clip_norm: float | None = None, augment: Mapping[str, Any] | None = None,
            callbacks: Iterable[Any] = (), run_dir: str | Path | None = None, name: str = "fit",
            classes: list[str] | None = None, verbose: int = 1, **trainer: Any) -> History:
        """Train with the Trainer the CLI uses; returns a History. Arguments carry the config's
        names: `schedule` ("cosine" or {"name": "cosine", "warmup_epochs": 1, ...}),
        `early_stopping` (True or {"monitor": "val_loss", "patience": 3, ...}), `grad_clip_norm`,
        `augment` ({"shift": 2, "rotate": 10, ...}), `precision` ("fp32", "tf32", "bf16": the
        Dense products' operand rounding, see the config key); other trainer.* keys (eval_batch_size,
        drop_last, monitor, keep_checkpoints, ...) pass through `**trainer`.

        `validation_data=(xv, yv)` is evaluated after every epoch (val_loss, val_accuracy), and
        is the run's test split; `validation_split` (a fraction) takes validation samples from
        the end of x instead. `callbacks`: objects with an optional `on_epoch_end(epoch, logs)`
        (epoch from 0, logs under Keras's names). `run_dir`: write the complete run folder there
        (config.yaml, run.json, data.npz holding x and y, checkpoints, metrics, weights.npz);
        without it fit works in a temporary folder it deletes. Each fit is a new run: the weights
        carry over, the optimizer state and schedule start afresh. verbose: 0 silent, 1 log and
        a progress bar on a terminal, 2 log only."""
        from gpuml.data.user import to_images

        if not self._compiled:
            raise GpumlError("fit: compile() the model first (e.g. model.compile(optimizer='adam'))")
        if validation_data is not None and validation_split:
            raise ConfigError("fit: give validation_data or validation_split, not both")
        xs = to_images(x, "fit: x")
        k = self._num_outputs(xs.shape[1:])
        ys = _labels(y, len(xs), "fit: y", k)
        xv, yv = xs[:0], ys[:0]
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ConfigError("fit: validation_data must be a pair (x_val, y_val)")
            xv = to_images(validation_data[0], "fit: validation_data x")
            yv = _labels(validation_data[1], len(xv), "fit: validation_data y", k)
            if xv.shape[1:] != xs.shape[1:]:
                raise DataError(f"fit: validation_data x has samples of shape {xv.shape[1:]}, x has {xs.shape[1:]}")
        if classes is not None and len(classes) != k:
            raise ConfigError(f"fit: classes names {len(classes)} classes, the model has {k} outputs")
        es = early_stopping
        if isinstance(es, bool):
            es = {"enabled": es}
        elif es is not None:
            es = {"enabled": True, **es}
        train_opts = {"epochs": epochs, "batch_size": batch_size, "grad_clip_norm": grad_clip_norm,
                      **({"early_stopping": es} if es is not None else {}), **trainer}
        with tempfile.TemporaryDirectory(prefix="gpuml-fit-") as tmp:
            # Data-parallel (under mpiexec): rank 0 keeps the run folder, the others work in
            # their temporary one (each writes the data.npz its Trainer reads).
            kept = run_dir is not None and distributed.world().is_root
            folder = Path(run_dir) if kept else Path(tmp) / "run"
            _refuse_existing_run(folder)
            data_path = folder.resolve() / "data.npz"
            from gpuml.data.user import save_npz_dataset

            save_npz_dataset(data_path, np.concatenate([xs, xv]), np.concatenate([ys, yv]), xv, yv,
                             classes or [str(i) for i in range(k)])
            raw = self._raw_config(name=name, device=device, seed=seed, dtype=dtype, precision=precision, data={
                "dataset": "npz", "path": str(data_path), "normalize": normalize, "download": False,
                "val_split": len(xv) if validation_data is not None else float(validation_split),
                "augment": dict(augment or {})}, schedule=schedule, trainer=train_opts)
            raw["model"]["input_shape"] = list(xs.shape[1:])
            return self._run(raw, folder, keep=run_dir is not None, callbacks=list(callbacks),
                             verbose=verbose, validated=validation_data is not None)

    def _run(self, raw: dict[str, Any], folder: Path, *, keep: bool, callbacks: list[Any],
             verbose: int, validated: bool) -> History:
        from gpuml.train.config import validate
        from gpuml.train.trainer import Trainer, out_of_memory_message, write_config, write_run_info

        cfg = validate(raw, "fit")
        log = _stderr if verbose else _quiet
        try:
            trainer = Trainer(cfg, folder, source="fit", log=log, model=self)
            if validated:  # validation_data is the run's test split (and its validation split)
                trainer.test_label = "val"
            if not keep:
                trainer.run_label = "(no run_dir: run folder not kept)"
            write_config(folder, cfg)
            write_run_info(folder, trainer)

            def on_epoch_end(row: dict[str, Any]) -> None:
                for cb in callbacks:
                    if hasattr(cb, "on_epoch_end"):
                        cb.on_epoch_end(row["epoch"] - 1, keras_logs(row))

            trainer.epoch_end_hooks.append(on_epoch_end)
            summary = trainer.fit(progress=None if verbose == 1 else False)
        except Exception as exc:
            oom = out_of_memory_message(exc, cfg["trainer"]["batch_size"])
            if oom is not None:
                raise oom from None
            raise
        d = trainer.data
        self._norm = (d.mean, d.std) if cfg["data"]["normalize"] else (0.0, 1.0)
        self._classes = list(d.classes)
        self._cfg = cfg
        return History(trainer.history, folder if keep else None, summary)

    def _raw_config(self, **sections: Any) -> dict[str, Any]:
        """A raw config for this model and its compile settings (validated by the caller)."""
        from gpuml.train.build import model_section

        raw = {k: v for k, v in sections.items() if v is not None}
        raw.update(model=model_section(self), optimizer=copy.deepcopy(self._optimizer),
                   loss=copy.deepcopy(self._loss))
        return raw

    def _num_outputs(self, sample_shape: Shape) -> int:
        """The model's output size for samples of `sample_shape`, by shape inference alone."""
        shape = tuple(sample_shape)
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.infer_shape(shape)
            except GpumlError as exc:
                raise ConfigError(f"fit: model.layers.{i}: {exc}") from None
        if len(shape) != 1:
            raise ConfigError(f"the model's output has shape {shape}; end it with a dense layer "
                              "giving one value per class")
        return shape[0]

    # ------------------------------------------------------------------ inference
    def _prepare(self, x: Any, what: str) -> np.ndarray:
        """x as 8-bit samples, with the model built for them (on first use: device auto)."""
        from gpuml.data.user import to_images

        xs = to_images(x, f"{what}: x")
        if not self.built:
            from gpuml.backend import get_backend
            from gpuml.train.build import build_model
            from gpuml.train.config import validate

            cfg = validate(self._raw_config(), what)
            build_model(cfg, get_backend("auto"), tuple(xs.shape[1:]), what, model=self)
        return xs

    def evaluate(self, x: Any, y: Any, batch_size: int = 1000) -> dict[str, float]:
        """{"loss": mean loss, "accuracy": fraction correct} over (x, y), in eval mode."""
        from gpuml.data.loader import BatchIterator, Split
        from gpuml.nn.buffers import Buffers
        from gpuml.train.build import build_loss
        from gpuml.train.config import validate
        from gpuml.train.trainer import evaluate_batches

        xs = self._prepare(x, "evaluate")
        ys = _labels(y, len(xs), "evaluate: y", self.output_shape[0])
        be = self.backend
        assert be is not None
        it = BatchIterator(be, Split(xs, ys), batch_size, mean=self._norm[0], std=self._norm[1])
        loss = build_loss(validate(self._raw_config(), "evaluate"), be, "evaluate")
        return evaluate_batches(self, loss, it, Buffers(be))

    def predict(self, x: Any, batch_size: int = 1000) -> np.ndarray:
        """Softmax probabilities (N, classes) as a new NumPy array, for x as fit takes it."""
        from gpuml.predict import predict_array

        xs = self._prepare(x, "predict")
        x01 = xs.astype(np.float64) / 255.0
        info = {"mean": self._norm[0], "std": self._norm[1]}
        assert self.backend is not None
        return predict_array(self, self.backend, info, x01, batch_size)

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path) -> Path:
        """Write a folder gpuml.load_model and `gpuml predict / export` read: config.yaml (the
        last fit's config, with this model's layers), run.json and weights.npz."""
        from gpuml import __version__
        from gpuml.data.atomic import atomic_write
        from gpuml.train.build import model_section
        from gpuml.train.config import validate
        from gpuml.train.trainer import write_config

        if not self.built:
            raise GpumlError("save: the model has no weights yet; fit (or predict once) first")
        folder = Path(path)
        base = copy.deepcopy(self._cfg) if self._cfg is not None else self._raw_config()
        base.update(model=model_section(self), optimizer=copy.deepcopy(self._optimizer),
                    loss=copy.deepcopy(self._loss))
        cfg = validate(base, "save")
        write_config(folder, cfg)
        info = {"gpuml_version": __version__, "dataset": cfg["data"]["dataset"],
                "classes": self._classes or [str(i) for i in range(self.output_shape[0])],
                "input_shape": list(self.input_shape), "mean": self._norm[0], "std": self._norm[1]}
        with atomic_write(folder / "run.json") as f:
            f.write(json.dumps(info, indent=2).encode())
        with atomic_write(folder / "weights.npz") as f:
            np.savez(f, **self.state_dict())
        return folder


def load_model(path: str | Path, device: str = "auto") -> Sequential:
    """A model saved by Sequential.save, or any run folder (CLI or fit): its final weights, or
    its newest checkpoint's when the run did not finish. Compiled with the config's optimizer
    and loss, normalised like its training data: ready to predict, evaluate or fit on."""
    from gpuml.backend import get_backend
    from gpuml.train.build import build_model, make_layer
    from gpuml.train.config import load_config
    from gpuml.weights import read_weights

    folder = Path(path)
    for name in ("config.yaml", "run.json"):
        if not (folder / name).is_file():
            raise GpumlError(f"{folder}: {name} is missing (not a saved model or run folder)")
    cfg = load_config(folder / "config.yaml", [f"device={device}"])
    info = json.loads((folder / "run.json").read_text())
    model = Sequential([make_layer(spec) for spec in cfg["model"]["layers"]])
    init = dict(cfg["model"])
    cfg["model"].update(init_from=None, init_skip=[])  # the saved weights replace them
    backend = get_backend(cfg["device"], dtype=cfg["dtype"])
    backend.set_precision(cfg["precision"])  # the saved run's precision, as it trained
    build_model(cfg, backend, tuple(info["input_shape"]), str(folder / "config.yaml"), model=model)
    model.init_from, model.init_skip = init["init_from"], init["init_skip"]
    model.load_state_dict(read_weights(folder), source=str(folder))  # weights.npz, else the last checkpoint
    model._optimizer, model._loss, model._compiled = cfg["optimizer"], cfg["loss"], True
    model._cfg, model._norm, model._classes = cfg, (info["mean"], info["std"]), info.get("classes")
    return model


def _labels(y: Any, n: int, where: str, k: int) -> np.ndarray:
    from gpuml.data.user import to_labels

    return to_labels(y, n, where, k)


def _refuse_existing_run(folder: Path) -> None:
    from gpuml.train import checkpoint as ckpt

    if ckpt.list_checkpoints(folder / "checkpoints") or (folder / "summary.json").exists():
        raise GpumlError(f"fit: {folder} already holds a run: continue it with `gpuml train --resume "
                         f"{folder}` or pass another run_dir")


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
    pass
