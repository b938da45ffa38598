"""Training methods, one module each (its `Config` table and its `Trainer`), found by name through `tuner.registry`."""
