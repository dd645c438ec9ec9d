"""The embedded demo store: corpus, tokenizer, sparse and dense models, tasks, circuits."""
