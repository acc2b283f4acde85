"""musa-curation: raw videos -> multi-subject annotated datasets (WebDataset shards + Parquet manifests)."""

__version__ = "0.1.0"
