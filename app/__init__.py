"""The Serve-side application: config, OpenAI protocol, model sources, and build_app()."""
