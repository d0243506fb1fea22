"""Read weights to initialise a model from (`model.init_from`, `Sequential.load_weights`): a run
folder, a weights .npz, a checkpoint .npz, or a .safetensors export (`gpuml export`, either
format: gpuml's names, or `--format torch`'s PyTorch names mapped back through its metadata).
The result is always the host arrays keyed "layer.param" (conv2d_1.W), gpuml's own names."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from gpuml.errors import DataError


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """The weights in `path`: a run folder (its weights.npz, else its newest checkpoint), a
    .npz of parameters or a checkpoint, or a .safetensors file (gpuml or torch layout)."""
    path = Path(path)
    if path.is_dir():
        from gpuml.train import checkpoint as ckpt

        if (path / "weights.npz").is_file():
            path = path / "weights.npz"
        elif ckpt.list_checkpoints(path / "checkpoints"):
            return ckpt.load(ckpt.list_checkpoints(path / "checkpoints")[-1])[0]
        else:
            raise DataError(f"{path}: a folder without weights.npz or checkpoints/ (not a run folder?)")
    if not path.is_file():
        raise DataError(f"{path}: no such weights file (a run folder, .npz or .safetensors)")
    if path.suffix == ".safetensors":
        from gpuml.export import read_safetensors, read_torch_safetensors

        tensors, meta = read_safetensors(path)
        # `--format torch` files hold PyTorch names and layouts; the metadata maps them back.
        return read_torch_safetensors(path) if meta.get("gpuml_format") == "torch" else tensors
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if "meta" in names:  # a checkpoint: its model/ arrays
                from gpuml.train import checkpoint as ckpt

                return ckpt.load(path)[0]
            return {k: z[k] for k in names}
    except (OSError, ValueError, zipfile.BadZipFile, AttributeError) as exc:
        raise DataError(f"{path}: not a readable .npz of weights ({type(exc).__name__}: {exc})") from None
