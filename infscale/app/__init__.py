"""The application layer: what the ``infscale`` command and the demo are made of, as library
functions (method registry, the user's factories, the results group, Dask clusters, the
pipeline). ``infscale.cli`` only parses arguments and calls these."""
