"""rmexp's Hydra configs, shipped inside the package as rmexp.conf (pkg://rmexp.conf)."""
