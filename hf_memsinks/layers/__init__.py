"""Sink layers: the patched projections and experts modules, the masking of sink neurons, and the
state of one forward call that every patched module of a model shares."""
