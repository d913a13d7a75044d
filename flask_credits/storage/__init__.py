"""Storage: the tables, the prebuilt statements, and the database (retries, autocommit reads, and
"the database cannot answer" turned into HTTP 503). The bottom layer: imports nothing of the package
but errors and records."""
