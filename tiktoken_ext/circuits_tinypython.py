"""tiktoken plugin: `tiktoken.get_encoding("tinypython_2k")`.

tiktoken finds plugins by listing the `tiktoken_ext` namespace package, so this directory
has no `__init__.py`. The files (`encoder.json` + `vocab.bpe`) are located by
`inference.tokenizer.find_tokenizer_files`: `CIRCUITS_TOKENIZER_DIR`, then the store's
`tinypython/` directory. tiktoken caches the encoding for the life of the process.
"""


def tinypython_2k() -> dict:
    # Imported here, not at module level: tiktoken imports every plugin module whenever any
    # encoding is first requested, and `inference` pulls in torch.
    from inference.tokenizer import encoding_kwargs

    return encoding_kwargs()


ENCODING_CONSTRUCTORS = {"tinypython_2k": tinypython_2k}
