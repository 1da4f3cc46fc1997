"""corrjax.train."""
