"""The sweep: Ray Tune search spaces, trials, the boundary searcher; from Python, `tune.api.sweep`."""
