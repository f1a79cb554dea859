from grammar_fixtures import backend_tokenizer, compiler, digit_lover, eos_ids, walk  # noqa: F401 (fixtures)
