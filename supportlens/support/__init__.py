"""Support staff's view of the store: lookups through the CLI or the HTTP API."""
