"""The methods: one engine per EM variant on the loop in :mod:`pyroem.em`, and full-Bayes NUTS."""
