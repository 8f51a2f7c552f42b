"""Positional schemes as tiny modules with one interface: the additive bias for T queries against S keys."""
