"""Q heads: how `Q(s, .)` is computed from a model's states."""
