"""Data and model math: the datasets, the VAEs, the ELBO's terms, their fused nodes, the diagnostics."""
