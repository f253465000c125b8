"""Example minpro plugins, one per entry-point group: `sapo` (objective), `regex` (verifier),
`openai` (sampler). Each is a peer of the built-ins: installing this package is enough."""
