"""Conformance base classes and the synthetic checkpoint generator, importable by plugin authors."""
