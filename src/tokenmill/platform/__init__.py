"""Accounts, keys, pricing, ledger, reservations, usage and rate limits over SQLAlchemy."""
