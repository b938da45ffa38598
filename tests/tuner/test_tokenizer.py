from tuner.tokenizer import BASIC_WORDS, build_t5_tokenizer, build_tokenizer

TEXTS = ["a photo of sks dog on the beach", "A Zebra, 42 hats!", "", " ".join(["dog"] * 40)]


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


def test_t5_tokenizer_gives_each_word_one_piece_and_pads_like_t5():
    tok = build_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.model_max_length) == (0, 1, 2, 32)
    ids = [tok(word).input_ids for word in BASIC_WORDS]
    assert all(len(i) == 2 and i[1] == tok.eos_token_id for i in ids)
    assert len({i[0] for i in ids}) == len(BASIC_WORDS) and min(i[0] for i in ids) > 2
    text = "a photo of sks dog"
    enc = tok(text, padding="max_length", max_length=tok.model_max_length)
    assert enc.input_ids == [tok(w).input_ids[0] for w in text.split()] + [1] + [0] * 26
    assert enc.attention_mask == [1] * 6 + [0] * 26


def test_t5_tokenizer_spells_out_other_words_and_truncates_before_eos():
    tok = build_t5_tokenizer()
    ids = tok("A Zebra, 42 hats!").input_ids
    assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id and len(ids) > 6
    assert tok.decode(ids, skip_special_tokens=True) == "A Zebra, 42 hats!"
    long = tok(TEXTS[-1], truncation=True, max_length=tok.model_max_length).input_ids
    assert len(long) == 32 and long[-1] == tok.eos_token_id
    assert build_t5_tokenizer(["zebra"])("zebra").input_ids == [4, 1]


def test_t5_tokenizer_round_trips_through_save(tmp_path):
    from transformers import AutoTokenizer, T5TokenizerFast

    tok = build_t5_tokenizer()
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and not list(tmp_path.glob("*.model"))
    want = [tok(t, padding="max_length", truncation=True, max_length=32).input_ids for t in TEXTS]
    for cls in (AutoTokenizer, T5TokenizerFast):
        again = cls.from_pretrained(tmp_path)
        assert again.get_vocab() == tok.get_vocab() and again.model_max_length == 32
        assert (again.pad_token_id, again.eos_token_id, again.unk_token_id) == (0, 1, 2)
        assert [again(t, padding="max_length", truncation=True, max_length=32).input_ids for t in TEXTS] == want
