"""Variational EM: closed-form mean-field VB (CAVI) and SVI with a guide."""
