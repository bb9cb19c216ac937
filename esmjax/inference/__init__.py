"""One inference engine: a model restored onto a mesh, length buckets, jitted forwards."""
