"""corrjax.optim."""
