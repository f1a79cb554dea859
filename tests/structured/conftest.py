from grammar_fixtures import backend_tokenizer, compiler, eos_ids, walk  # noqa: F401 (fixtures)
