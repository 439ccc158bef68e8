"""Model resolution and routing decisions: pure functions, no I/O."""
