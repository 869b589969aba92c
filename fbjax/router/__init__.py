"""Cluster routing: one policy code shared by the HTTP router, Ray Serve and the simulator."""
