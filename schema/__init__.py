"""The data contract: the TFMD schema of candidate rows and the feature roles built on it."""
