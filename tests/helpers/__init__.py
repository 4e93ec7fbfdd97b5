"""Support code for tests that is not itself a test module (e.g. subprocess children)."""
