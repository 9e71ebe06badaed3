"""Built-in synthetic domains; importing this package registers them."""
