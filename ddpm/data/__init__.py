"""Input pipelines: numpy batches {"image": float32 [B, H, W, C] in [-1, 1], "label": int32 [B]}.

Sources (config.data.source): "mnist5k" (embedded, offline, assets/README.md), "sines"
(embedded 1-D signals [L, C], sines.py),
"tfds:<name>" (prepared TFDS data, tfds_source.py), "folder:<path>" (folder.py),
"npz:<path>" (arrays.py). Order, sharding and resumption: pipeline.py.
"""

from ddpm.data.info import DatasetInfo, check_fields, dataset_info, validate_data_config
from ddpm.data.pipeline import DataIterator, create_dataset

__all__ = [
    "DataIterator",
    "DatasetInfo",
    "check_fields",
    "create_dataset",
    "dataset_info",
    "validate_data_config",
]
