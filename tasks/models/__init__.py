"""Model definitions of the task families; each states its parameters' muP roles."""
