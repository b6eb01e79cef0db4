"""Ray job pipelines: segment a directory, glob or table of images into Parquet (`python -m pipelines.segment`)."""
