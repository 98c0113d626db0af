"""The model square: declared deployments, listings, live figures, search and routing to replicas."""
