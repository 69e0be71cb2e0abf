"""Data layer: readers for image files, DICOM, NIfTI and MedMNIST; data set layouts; the built-in synthetic
phantoms; and `load_data`, which turns any of them into train / val / test datasets of Samples."""

from aeflow.data.dataset import DataSplits, Decoded, ImageDataset, decode_record, load_data
from aeflow.data.describe import describe, summarize
from aeflow.data.intensity import IntensityRule, parse_intensity, to_unit_range
from aeflow.data.layouts import available_layouts, build_records, layout_options, scan_inputs
from aeflow.data.readers import MAX_PIXELS, READABLE_SUFFIXES, RawImage, expand_source, read_mask, read_raw
from aeflow.data.records import Record, SplitRecords, load_splits, save_splits
from aeflow.data.sample import Batch, Sample, collate
from aeflow.data.synthetic import make_phantom

__all__ = [
    "MAX_PIXELS", "READABLE_SUFFIXES", "Batch", "DataSplits", "Decoded", "ImageDataset", "IntensityRule", "RawImage",
    "Record", "Sample", "SplitRecords", "available_layouts", "build_records", "collate", "decode_record", "describe",
    "expand_source", "layout_options", "load_data", "load_splits", "make_phantom", "parse_intensity", "read_mask",
    "read_raw", "save_splits", "scan_inputs", "summarize", "to_unit_range",
]
