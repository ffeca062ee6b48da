"""The retrieval service: HTTP server, clients, sharding (local threads or Ray Serve)."""
