"""Custom TFX components of the cascade."""
