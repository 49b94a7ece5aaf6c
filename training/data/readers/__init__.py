"""Dataset readers: file layouts -> `DatasetSplits` of absolute image paths (no pixels, no torch).

    read_dataset("oxford_pets", "/data")            # /data/oxford_pets/{images,split_zhou_OxfordPets.json}
    read_dataset("office_home", "/data", domain="art")
    read_domains("office_home", "/data")            # {domain: splits}, each domain a task
    read_image_folder(DIR) / read_split_zhou(FILE.json, IMAGE_DIR) / read_csv_tasks(FILE.csv)

Reader modules are imported here explicitly (the registry is filled by their decorators in this
one place), so `list_readers()` is complete once this package is imported.
A wrong root raises `DatasetLayoutError` (a ValueError) naming the layout the reader expects.
"""
from __future__ import annotations

from . import coop, domains, generic, imagenet  # noqa: F401  (registers the readers)
from ._common import DatasetLayoutError, alike_classnames, clean_classname
from ._registry import get_reader, list_domains, list_readers, read_dataset, read_domains, register_reader
from .coop import SPLIT_JSON_DATASETS, read_fgvc_aircraft
from .domains import MINI_DOMAINNET_DOMAINS, OFFICE_HOME_DOMAINS, read_mini_domainnet, read_office_home, read_synthetic
from .generic import read_csv, read_csv_tasks, read_image_folder, read_split_zhou
from .imagenet import read_imagenet, read_imagenet_a, read_imagenet_r, read_imagenet_sketch, read_imagenet_v2

__all__ = [
    "DatasetLayoutError",
    "MINI_DOMAINNET_DOMAINS",
    "OFFICE_HOME_DOMAINS",
    "SPLIT_JSON_DATASETS",
    "alike_classnames",
    "clean_classname",
    "get_reader",
    "list_domains",
    "list_readers",
    "read_csv",
    "read_csv_tasks",
    "read_dataset",
    "read_domains",
    "read_fgvc_aircraft",
    "read_image_folder",
    "read_imagenet",
    "read_imagenet_a",
    "read_imagenet_r",
    "read_imagenet_sketch",
    "read_imagenet_v2",
    "read_mini_domainnet",
    "read_office_home",
    "read_split_zhou",
    "read_synthetic",
    "register_reader",
]
