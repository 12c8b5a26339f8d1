"""FQAT (Jiang et al., ACM MM 2025): SAGM objective with gradient-disorder freezing of scale factors."""
