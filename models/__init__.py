"""The model manifest (``manifest.toml``); fetched GGUF files land beside it only in a source checkout."""
