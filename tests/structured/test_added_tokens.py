"""Added tokens that are not special (Qwen's <tool_call>, <think>) are ordinary text to grammars:
llguidance would take them for special ones, allow one where a grammar writes its text, then
refuse it when consumed."""

from tokenizers import AddedToken

from parley.structured import GrammarCompiler, allocate_bitmask, bitmask_to_bool
from parley.types import Grammar
from tiny_model import _train_tokenizer


def test_a_grammar_writes_an_added_tokens_text_and_takes_the_token():
    tokenizer = _train_tokenizer(400)
    tokenizer.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    token = tokenizer.token_to_id("<tool_call>")
    eos = tokenizer.token_to_id("<|im_end|>")
    compiler = GrammarCompiler(tokenizer, [eos], tokenizer.get_vocab_size())
    grammar = Grammar(kind="lark", value='start: TEXT "<tool_call>" "!"\nTEXT: /[a-z]*/\n')

    matcher = compiler.matcher(grammar)
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    assert bitmask_to_bool(bitmask, compiler.vocab_size)[0, token]  # after free text: the token itself
    assert matcher.accept(token), matcher.error

    matcher = compiler.matcher(grammar)  # or its text in pieces
    for piece in tokenizer.encode("ab", add_special_tokens=False).ids + [tokenizer.token_to_id("<")]:
        assert matcher.accept(piece), matcher.error
