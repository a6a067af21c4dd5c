"""The helpers every stage shares: the error base, message cutting, value checks, safe file
reading and writing, tables, module names and random state."""
