"""Datasets: IDX files, the registry of known datasets (lookup, download, checksums), the
user's own npz/IDX data, and batching on a backend."""

from gpuml.data.datasets import DATASETS, DatasetFiles, DatasetSpec, fetch_dataset, get_spec
from gpuml.data.idx import read_idx, write_idx
from gpuml.data.loader import BatchIterator, Dataset, Split, load_dataset, load_dataset_config
from gpuml.data.user import save_npz_dataset

__all__ = [
    "DATASETS",
    "BatchIterator",
    "Dataset",
    "DatasetFiles",
    "DatasetSpec",
    "Split",
    "fetch_dataset",
    "get_spec",
    "load_dataset",
    "load_dataset_config",
    "read_idx",
    "save_npz_dataset",
    "write_idx",
]
