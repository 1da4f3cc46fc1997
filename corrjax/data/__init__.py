"""corrjax.data."""
