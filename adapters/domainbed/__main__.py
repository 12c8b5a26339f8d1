"""``python -m dg_quant.adapters.domainbed train|sweep|collect_results ...`` (see ``launcher``)."""

import sys

from dg_quant.adapters.domainbed.launcher import main

if __name__ == "__main__":
    sys.exit(main())
