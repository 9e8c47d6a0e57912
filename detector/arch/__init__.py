"""Architecture codes, torch-free: the grammar (``grammar``), the named architectures (``zoo``) and the
token space a searcher samples from (``space``). Nothing here imports torch."""
