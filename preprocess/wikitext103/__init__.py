"""WikiText-103 (tokenised, ``wikitext-103-v1``): the given ``wiki.{train,valid,test}.tokens`` used as is."""
