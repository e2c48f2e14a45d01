"""The merge engine: one base, memory-mapped vectors and a few merged-model slots shared by every front end."""
