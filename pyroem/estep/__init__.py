"""E-steps: exact enumeration (mixtures, streams, programs, chains) and draws (exact, NUTS)."""
