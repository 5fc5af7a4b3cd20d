"""The corpus contract: schema and checks, atomic parquet/JSON I/O, shards, chat-templated prompts, pairs, budget."""
