"""Optimizers registered with fairseq (LAMB, Adagrad with per-tensor clipping) arrive with their systems' issues."""
