"""Client side of the node: talking to peer AEs."""
