"""Real stamps brought in: .npy/.npz arrays into a store (``ingest``), their per-stamp
metadata tables, and resumable verified downloads (``fetch``)."""
