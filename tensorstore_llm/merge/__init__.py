"""Merge methods and recipes: each builds plans for the engine, never streams by itself."""
