"""Example minpro plugins: `spo` (objective) and `regex` (verifier). Each is a peer of the
built-ins: installing this package is enough. Sampler plugins with real back ends live in
plugins/minpro-openai and plugins/minpro-vllm."""
