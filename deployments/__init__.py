"""The Ray shell: every Serve deployment (router, tokenizer, llm_server) and Ray actor (registry_service,
job_runner), build_app() and the `llmaas` command. The top room: nothing below imports it."""
