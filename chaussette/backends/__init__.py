"""Server backends: one small adapter per library, and the registry that names them."""
