"""Built-in recipes (YAML), shipped with the package so an installed rlcore finds them."""
