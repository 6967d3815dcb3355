"""The trace-driven simulator: the engine's planner, policies and predictors replayed over a routing
trace and timed by an event model of one compute stream and one copy stream, for models and GPUs
one does not have. Named baselines and `moepic simulate` / `moepic compare` are built on it."""
