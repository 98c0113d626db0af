"""The inference engine: no HTTP, no money, no database."""
