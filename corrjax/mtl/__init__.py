"""corrjax.mtl."""
