"""Scoring candidate files: the plan, chunk tasks on threads or a Dask cluster, the
journal, inference and occlusion maps, and the scores written back beside each file."""
