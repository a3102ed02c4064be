"""Retraining: the example training pipeline, the trigger policy and the controller."""
