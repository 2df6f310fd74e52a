"""Bulk captioning of an image collection into Parquet shards, resumable, on this machine or on Ray.

The entry point is clipcap.bulk.run (`BulkConfig`, `caption_dataset`); nothing is imported here, so
listing images (clipcap.bulk.sources, which `clipcap caption` uses) does not load pyarrow.
"""
