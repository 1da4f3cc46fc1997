"""corrjax.stats."""
