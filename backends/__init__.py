"""Runtime backends, registered by name and imported lazily."""
