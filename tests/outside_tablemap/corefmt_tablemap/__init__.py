"""A small format written only for the tests, against corefmt's public API:
two-level tables kept in corefmt's MetadataCache, data in an external data
file, crash safety by write ordering, named events for fault injection."""
