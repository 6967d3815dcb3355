"""Side effects live here: timing, progress, generation loops (and, later, streams and pinned memory)."""
