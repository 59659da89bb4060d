"""Taking a model to the line: one inspector for every way of scoring (CLI, service, Ray), exported graphs
that run without torch, the HTTP inspection service and scoring across processes and machines."""
