"""Small shared helpers: atomic file writes, config printing, task wrapper."""
