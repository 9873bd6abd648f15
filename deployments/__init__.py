"""Ray Serve deployments: one file each (router, tokenizer, llm_server); engine/ has no Ray inside."""
