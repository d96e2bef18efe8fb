"""Data: captioned image folders, aspect-ratio buckets and the demo digits."""

from starflow.data.aspect import ASPECT_RATIOS, AspectBucketBatchSampler, aspect_to_size, nearest_aspect, parse_aspect
from starflow.data.digits import load_digit_split, split_indices, write_digits
from starflow.data.images import CorruptImageError, ImageFolder, collate, load_image

__all__ = [
    "ASPECT_RATIOS",
    "AspectBucketBatchSampler",
    "CorruptImageError",
    "ImageFolder",
    "aspect_to_size",
    "collate",
    "load_digit_split",
    "load_image",
    "nearest_aspect",
    "parse_aspect",
    "split_indices",
    "write_digits",
]
