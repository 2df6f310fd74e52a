"""Bulk captioning of an image collection into Parquet shards, resumable, on this machine or on Ray."""
from clipcap.bulk.run import BulkConfig, Interrupted, caption_dataset

__all__ = ["BulkConfig", "Interrupted", "caption_dataset"]
