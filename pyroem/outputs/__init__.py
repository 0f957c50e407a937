"""What is read from fits: label alignment, comparisons, choosing K, pointwise log-likelihoods."""
