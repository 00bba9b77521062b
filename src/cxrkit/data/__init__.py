"""Data: sources (Kaggle or local), reading images, audit, splits, transforms, loading."""

from cxrkit.data.io import UnreadableImageError, read_image
from cxrkit.data.layout import DataLayoutError, DataSource, Sample, load_source
from cxrkit.data.split import patient_split, read_manifest, write_manifest

__all__ = [
    "DataLayoutError", "DataSource", "Sample", "UnreadableImageError", "load_source",
    "patient_split", "read_image", "read_manifest", "write_manifest",
]
