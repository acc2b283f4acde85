"""The thin Wan2.1 trainer that consumes the pipeline's shards (`curation train`). Needs the `train` extra (torch,
diffusers, transformers); nothing here is imported by the pipeline."""
