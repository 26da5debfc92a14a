"""Our own preference pairs, shipped inside rmexp as the package rmexp.sample (config: ${rmexp.sample:<file>})."""
