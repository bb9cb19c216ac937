"""Test helpers: reference models, data fixtures, the GCS emulator, shared-data paths."""
