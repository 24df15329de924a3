"""The results tables: their schemas and writers, the collapse rules and map, a run folder's identity."""
