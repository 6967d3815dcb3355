"""The expert cache, as pure functions: budget → per-layer layout, the residency planner, counters
and trace replay. The engine (moepic/runtime/offload.py) executes the plans; nothing here copies.
"""
