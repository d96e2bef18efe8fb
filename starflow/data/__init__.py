"""Data: captioned image folders, webdataset shards, latent caches, aspect-ratio buckets and the demo digits."""

from starflow.data.aspect import (ASPECT_RATIOS, AspectBucketBatchSampler, ResumableBatchSampler, aspect_to_size,
                                  nearest_aspect, parse_aspect)
from starflow.data.build import build_dataset, build_secondary_dataset
from starflow.data.digits import load_digit_split, split_indices, write_digits
from starflow.data.images import CorruptImageError, ImageFolder, collate, load_image
from starflow.data.latent_cache import (cache_latents, cache_settings, check_cache_settings, check_cacheable,
                                        load_uncond)
from starflow.data.seeding import sample_seed
from starflow.data.shards import pack_folder, read_index
from starflow.data.stream import STREAM_VERSION, BatchPosition, PositionTracker, ShardStream, continue_positions

__all__ = [
    "ASPECT_RATIOS",
    "STREAM_VERSION",
    "AspectBucketBatchSampler",
    "BatchPosition",
    "CorruptImageError",
    "ImageFolder",
    "PositionTracker",
    "ResumableBatchSampler",
    "ShardStream",
    "aspect_to_size",
    "build_dataset",
    "build_secondary_dataset",
    "cache_latents",
    "cache_settings",
    "check_cache_settings",
    "check_cacheable",
    "collate",
    "continue_positions",
    "load_digit_split",
    "load_image",
    "load_uncond",
    "nearest_aspect",
    "pack_folder",
    "parse_aspect",
    "read_index",
    "sample_seed",
    "split_indices",
    "write_digits",
]
