"""Benchmarks on Google's Firestore emulator: `python -m bench` runs them all (`make bench`)."""
