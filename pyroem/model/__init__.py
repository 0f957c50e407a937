"""What is fitted: mixtures, families, priors, a Pyro program's sites, parameter spaces."""
