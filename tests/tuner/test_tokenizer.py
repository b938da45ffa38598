from tuner.tokenizer import BASIC_WORDS, build_tokenizer


def test_every_vocabulary_word_is_one_token():
    tok = build_tokenizer()
    for word in BASIC_WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))


def test_unknown_words_still_tokenize_by_letters():
    tok = build_tokenizer()
    ids = tok("zebra").input_ids
    assert len(ids) > 3
    assert tok.unk_token_id not in ids[1:-1]


def test_tokenizer_round_trips_through_save(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "a photo of sks dog on the beach"
    assert again(text).input_ids == tok(text).input_ids
