"""Medical vocabularies read once (HPO, MeSH diseases, drugs, ICD-10-CM), shared by the default KB and the rewards.

- :mod:`medrwr.vocab.concepts` -- the ``Concept`` record, its id spellings, the synonym rule, data files.
- :mod:`medrwr.vocab.sources` -- concepts by source name; which vocabularies are installed.
- :mod:`medrwr.vocab.hpo`, :mod:`medrwr.vocab.fds`, :mod:`medrwr.vocab.icd` -- one reader per source package.
- :mod:`medrwr.vocab.passages` -- one plain-text passage per concept (the default KB's text, the static
  encoder's IDF reference texts).
"""
