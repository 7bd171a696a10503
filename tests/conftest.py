"""Shared test set-up: quiet TensorFlow logs, keep Beam in-process."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
