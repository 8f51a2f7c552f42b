"""text8: 10^8 characters of cleaned Wikipedia text (a-z and space), modelled one token per character."""
