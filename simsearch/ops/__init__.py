"""What a user runs on an index: ingest, dedup, calibrate, moves, cluster, label, export."""
