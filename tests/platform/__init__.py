"""Platform tests: accounts, keys, billing and rate limits against real SQLite, PostgreSQL and Redis."""
