"""Multi-task aggregators: Optax transformations from task-stacked gradients to one update."""
