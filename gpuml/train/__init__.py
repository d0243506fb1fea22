"""Config schema, trainer loop, checkpoints and metrics."""
