"""Per-sequence sampling inside one mixed batch."""
