"""Where dg-quant meets other software: hosts (WILDS, DomainBed) and backbones."""
