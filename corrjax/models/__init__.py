"""corrjax.models."""
