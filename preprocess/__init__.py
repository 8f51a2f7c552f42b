"""Corpus preparation for fairseq_ext: split, tokenise and binarise language-modelling corpora.

One sub-package per corpus (``wikitext103``, ``enwik8``, ``text8``, ``embedded``) plus ``sentencepiece``
for subword vocabularies. Each module has a CLI (``python -m preprocess.<corpus>.<module> --help``); the
shell drivers are ``scripts/prepare-<corpus>.sh``. Expected counts per corpus are in ``preprocess/README.md``.
"""
