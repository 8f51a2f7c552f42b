"""enwik8: the first 10^8 bytes of a 2006 English Wikipedia XML dump, modelled one byte per token."""
