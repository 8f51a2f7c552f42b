"""Subword vocabularies: train a sentencepiece model on a train split, encode all splits, binarise."""
