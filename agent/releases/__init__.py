"""Releases: signed manifests, verified downloads, the on-disk store and the hot swap."""
