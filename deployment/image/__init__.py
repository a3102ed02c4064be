"""The device image and the Docker engine that builds and runs it."""
