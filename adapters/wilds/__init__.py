"""The WILDS host: ``wilds_run``, datasets exposed as WILDS datasets, and metrics glue."""
