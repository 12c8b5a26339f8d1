"""Domain-generalization methods as plain functions and modules, free of hooks and hosts.

The plugins ``dg_quant.coral``, ``dg_quant.mixstyle``, ``dg_quant.swad``, ``dg_quant.sam`` and
``dg_quant.swa`` wire these into the hooks, so ``wilds_run`` and the DomainBed algorithms run the
same maths; tests check each against an independent computation.
"""
