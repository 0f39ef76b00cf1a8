"""Testing helpers for msgkit: broker fixtures (pytest plugin) and the transport contract suite."""
