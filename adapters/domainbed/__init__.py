"""The DomainBed host: dg-quant algorithms registered into a DomainBed checkout, and a launcher."""
