"""An output directory: its layout, schema and lease, and what reads it (query, summary, draw, eval)."""
