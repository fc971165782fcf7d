"""Vector search: FAISS planning, the vector index and its on-disk cache."""
