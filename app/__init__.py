"""The Ray-free core: config, OpenAI protocol, errors, names, auth, model sources, storage (local and object
stores behind one seam), the adapter registry and cache, and the OpenAI serving logic. Imports only the engine."""
