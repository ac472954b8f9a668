"""transformers model loading and corpus reading / packing, shared by the domain packages."""
