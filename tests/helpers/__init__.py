"""Test helpers: composed configs and the tiny stage overrides (``configs``), tiny nets and exports (``nets``),
and ``RunIf`` (skip a test where its requirement is missing)."""
