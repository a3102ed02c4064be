"""Cloud side: registry, signing, artifact upload, rollout and retraining."""
