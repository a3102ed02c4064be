"""Publishing a model: registry, signing, artifacts, release manifests, ring rollout, audit."""
