"""SAM 2: generator parameters, the adapter over sam2's internals, the engine, models, weights."""
