"""C-FIND: read an identifier (request), match it against the index (matching, engine)."""
