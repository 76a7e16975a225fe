"""moe_jax.data: embedded sources, tokenizer, stdlib corpus, BatchIterator, TFDS source."""
import socket
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_jax.data import SOURCES, BatchIterator, ByteTokenizer, make_source
from moe_jax.data import audio, digits, text

# spec -> {key: (shape, dtype)}; every embedded source and split.
SCHEMAS = {
    "digits_image": {"image": ((8, 8, 1), np.float32), "label": ((), np.int32)},
    "digits_caption": {"image": ((8, 8, 1), np.float32), "text": ((32,), np.int32),
                       "label": ((), np.int32)},
    "digits_video": {"video": ((4, 8, 8, 1), np.float32), "label": ((), np.int32)},
    "dtmf_audio": {"audio": ((32, 32), np.float32), "label": ((), np.int32),
                   "text": ((32,), np.int32)},
    "stdlib_text": {"tokens": ((129,), np.int32)},
}
SPECS = [f"{name}:{split}" for name, cls in SOURCES.items() for split in cls.splits]
LENGTHS = {"digits_image:train": 1437, "digits_image:test": 360, "digits_caption:train": 1437,
           "digits_caption:test": 360, "digits_video:train": 2000, "digits_video:test": 400,
           "dtmf_audio:train": 2000, "dtmf_audio:test": 400, "stdlib_text:train": 100_000,
           "stdlib_text:validation": 2_000}


def _sklearn_digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images / 16.0, d.target


# ---- embedded sources ---------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS)
def test_embedded_source_schema_and_ranges(spec):
    source = make_source(spec)
    assert len(source) == LENGTHS[spec]
    schema = SCHEMAS[spec.split(":")[0]]
    assert set(source.modalities) == set(schema) - {"label"}
    for i in (0, 1, len(source) - 1):
        ex = source[i]
        assert set(ex) == set(schema)
        for key, (shape, dtype) in schema.items():
            assert ex[key].shape == shape and ex[key].dtype == dtype, key
        for key in {"image", "video"} & set(ex):
            assert 0.0 <= ex[key].min() and ex[key].max() <= 1.0
        for key in {"text", "tokens"} & set(ex):
            assert 0 <= ex[key].min() and ex[key].max() < ByteTokenizer.vocab_size
        if "label" in ex:
            assert 0 <= ex["label"] < source.num_classes == len(source.class_names) == 10
    if "audio" in schema:  # fixed normalisation gives roughly zero mean, unit variance
        x = np.stack([source[i]["audio"] for i in range(200)])
        assert abs(x.mean()) < 0.3 and 0.7 < x.std() < 1.3


@pytest.mark.parametrize("spec", SPECS)
def test_embedded_sources_are_deterministic(spec):
    a, b = make_source(spec), make_source(spec)
    for i in (0, 7, len(a) // 2):
        ea, eb = a[i], b[i]
        for key in ea:
            np.testing.assert_array_equal(ea[key], eb[key])
    if len(a) > 8:  # and different indices give different examples
        key = next(iter(SCHEMAS[spec.split(":")[0]]))
        assert any(not np.array_equal(a[0][key], a[i][key]) for i in range(1, 8))


def test_digits_splits_are_disjoint_and_match_sklearn():
    images, targets = _sklearn_digits()
    train, test = digits.DigitsImage("train"), digits.DigitsImage("test")
    assert not set(train.rows) & set(test.rows)
    assert len(set(train.rows) | set(test.rows)) == len(targets)
    for source in (train, test):
        for i in (0, 5, len(source) - 1):
            row = source.rows[i]
            np.testing.assert_allclose(source[i]["image"][..., 0], images[row], rtol=1e-6)
            assert source[i]["label"] == targets[row]


def test_digits_caption_names_its_label():
    source = make_source("digits_caption:test")
    tok = ByteTokenizer()
    captions = set()
    for i in range(40):
        ex = source[i]
        caption = tok.decode(ex["text"])
        label = int(ex["label"])
        assert text.DIGIT_NAMES[label] in caption.split() or str(label) in caption.split()
        captions.add(caption.replace(text.DIGIT_NAMES[label], "#").replace(str(label), "#"))
    assert len(captions) >= 4  # several phrasings are used


@pytest.mark.parametrize("split", digits.SPLITS)
def test_video_label_is_the_digit_shown_exactly_twice(split):
    images, targets = _sklearn_digits()
    rows_of = {}  # image bytes -> sklearn rows with those pixels
    for row, image in enumerate(images.astype(np.float32)):
        rows_of.setdefault(image.tobytes(), []).append(row)
    split_rows = set(digits.DigitsImage(split).rows)
    source = make_source(f"digits_video:{split}")
    first_frame_hits = 0
    for i in range(60):
        ex = source[i]
        frame_rows = [rows_of[frame[..., 0].tobytes()] for frame in ex["video"]]
        frame_labels = []
        for rows in frame_rows:
            assert len({targets[r] for r in rows}) == 1  # the pixels identify the digit
            assert set(rows) & split_rows  # frames come from this split
            frame_labels.append(int(targets[rows[0]]))
        label = int(ex["label"])
        assert frame_labels.count(label) == 2
        others = [d for d in frame_labels if d != label]
        assert len(set(others)) == 2  # two other, distinct digits
        same = [k for k, d in enumerate(frame_labels) if d == label]
        assert not np.array_equal(ex["video"][same[0]], ex["video"][same[1]])
        first_frame_hits += frame_labels[0] == label
    assert 10 < first_frame_hits < 50  # the label's frames are not at fixed positions


# ---- audio --------------------------------------------------------------------------

DTMF_TABLE = {1: (697, 1209), 2: (697, 1336), 3: (697, 1477), 4: (770, 1209),
              5: (770, 1336), 6: (770, 1477), 7: (852, 1209), 8: (852, 1336),
              9: (852, 1477), 0: (941, 1336)}


@pytest.mark.parametrize("digit", range(10))
def test_dtmf_tone_has_the_keypad_frequencies(digit):
    wave = audio.dtmf_tone(digit, audio.SAMPLE_RATE)  # 1 s: 1 Hz FFT bins
    magnitude = np.abs(np.fft.rfft(wave))
    freqs = np.fft.rfftfreq(wave.size, 1 / audio.SAMPLE_RATE)
    assert sorted(freqs[np.argsort(magnitude)[-2:]]) == list(DTMF_TABLE[digit])


def test_dtmf_spectrograms_differ_between_digits():
    specs = [audio.log_mel(audio.dtmf_tone(d, audio.CLIP_SAMPLES)) for d in range(10)]
    for a in range(10):
        for b in range(a + 1, 10):
            assert np.abs(specs[a] - specs[b]).max() > 1.0, (a, b)
    # The noisy source's clips of one digit look more alike than clips of two digits.
    source = make_source("dtmf_audio:test")
    peak = np.stack([source[i]["audio"].max(axis=0) for i in range(100)])  # [N, mels]
    labels = np.array([source[i]["label"] for i in range(100)])
    centroids = np.stack([peak[labels == d].mean(0) for d in range(10)])
    nearest = np.argmin(((peak[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() > 0.6  # chance: 0.1


def test_mel_filterbank_is_triangular_and_covers_every_band():
    fb = audio.mel_filterbank()
    assert fb.shape == (audio.NUM_MELS, audio.N_FFT // 2 + 1)
    assert fb.min() >= 0 and fb.max() <= 1
    assert (np.count_nonzero(fb, axis=1) >= 2).all()
    assert (np.diff(np.argmax(fb, axis=1)) >= 0).all()  # band centres increase


# ---- text ---------------------------------------------------------------------------

def test_difficulty_knobs_cut_noise_and_lower_the_snr():
  clean, cut = make_source("digits_image:train"), make_source("digits_image:train", size=7)
  assert len(cut) == 7 and np.array_equal(cut[3]["image"], clean[3]["image"])
  with pytest.raises(IndexError, match="example 7 out of range"):
    cut[7]  # pylint: disable=pointless-statement
  noisy = make_source("digits_image:train", noise=0.3)
  a, b = noisy[3]["image"], make_source("digits_image:train", noise=0.3)[3]["image"]
  assert np.array_equal(a, b)  # fixed per (split, index)
  assert a.min() >= 0.0 and a.max() <= 1.0
  assert 0.1 < np.abs(a - clean[3]["image"]).mean() < 0.4  # clipped N(0, 0.3)
  clip = make_source("digits_video:train", noise=0.3)[5]["video"]
  assert not np.array_equal(clip, make_source("digits_video:train")[5]["video"])
  caption = make_source("digits_caption:train", size=4, noise=0.3)
  assert len(caption) == 4 and np.array_equal(caption[2]["image"], noisy[2]["image"])
  # Lower SNR: the spectrogram moves away from the clean-ish default's tone pattern.
  loud = audio.synthesize(3, np.random.default_rng(0))
  quiet = audio.synthesize(3, np.random.default_rng(0), snr_db=(-12.0, -12.0))
  assert np.std(quiet) > 2 * np.std(loud)
  for kwargs, match in ((dict(size=0), "size=0 must be in"), (dict(noise=1.5), "noise=1.5")):
    with pytest.raises(ValueError, match=match):
      make_source("digits_image:train", **kwargs)
  with pytest.raises(ValueError, match=r"snr_db=\(3, 1\) must be"):
    make_source("dtmf_audio:train", snr_db=(3, 1))


def test_byte_tokenizer_round_trip_pad_and_truncate():
    tok = ByteTokenizer()
    s = "héllo, wörld ✓ 7"
    ids = tok.encode(s, 64)
    assert ids.dtype == np.int32 and ids.shape == (64,)
    assert tok.decode(ids) == s
    n = len(s.encode("utf-8"))
    assert (ids[n:] == 0).all() and (ids[:n] > 0).all()
    assert tok.encode("abc", 2).tolist() == [ord("a") + 1, ord("b") + 1]
    assert tok.vocab_size == 257 and tok.encode("\xff", 4).max() < tok.vocab_size


def test_every_caption_fits_in_the_text_length():
    tok = ByteTokenizer()
    captions = [text.digit_captions(d, v) for d in range(10) for v in range(text.NUM_CAPTION_VARIANTS)]
    captions += [t.format(name=text.DIGIT_NAMES[d], digit=d) for d in range(10) for t in audio.TONE_TEMPLATES]
    for caption in captions:
        assert tok.decode(tok.encode(caption, digits.TEXT_LENGTH)) == caption


def test_captions_and_prompts():
    assert text.digit_captions(7, 0) == "a handwritten seven"
    assert text.digit_captions(7, 1) == "the digit 7"
    assert len({text.digit_captions(3, v) for v in range(text.NUM_CAPTION_VARIANTS)}) >= 4
    assert text.class_prompts(["one", "two"]) == ["a photo of the digit one", "a photo of the digit two"]
    assert text.class_prompts(["a"], "the sound of {}") == ["the sound of a"]


def test_stdlib_corpus_split_is_fixed_and_disjoint():
    train, val = text.stdlib_files("train"), text.stdlib_files("validation")
    assert train and val and not set(train) & set(val)
    assert all(zlib.crc32(p.encode()) % 20 == 0 for p in val)
    assert not any(p.split("/")[0] in {"test", "idlelib", "site-packages"} for p in train + val)
    for split, cap in (("train", 8 << 20), ("validation", 1 << 20)):
        corpus = text.stdlib_corpus(split)
        assert 100_000 < len(corpus) <= cap
    source = make_source("stdlib_text:validation", seq_len=16)
    window = bytes((source[3]["tokens"] - 1).astype(np.uint8).tolist())
    assert len(window) == 17 and window in text.stdlib_corpus("validation")


# ---- make_source --------------------------------------------------------------------

def test_make_source_errors():
    with pytest.raises(ValueError, match="digits_video") as info:
        make_source("nope:train")
    assert all(name in str(info.value) for name in SOURCES)
    with pytest.raises(ValueError, match=r"'validation'.*\['train', 'test'\]"):
        make_source("digits_image:validation")
    with pytest.raises(ValueError, match=r"\['train', 'validation'\]"):
        make_source("stdlib_text:test")
    with pytest.raises(ValueError, match="names no TFDS dataset"):
        make_source("tfds:")
    assert make_source("digits_image").split == "train"


# ---- BatchIterator ------------------------------------------------------------------

class _Range:
    """Tiny source: example i = {"idx": i, "x": [i, i, i]}."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"idx": np.int32(i), "x": np.full(3, i, np.float32)}


def _add_noise(example, rng):
    return {**example, "x": example["x"] + rng.random(3).astype(np.float32)}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_batch_iterator_is_deterministic_and_seeded():
    a = _take(BatchIterator(_Range(50), 8, seed=3, transform=_add_noise), 10)
    b = _take(BatchIterator(_Range(50), 8, seed=3, transform=_add_noise), 10)
    _assert_batches_equal(a, b)
    c = _take(BatchIterator(_Range(50), 8, seed=4), 1)
    assert not np.array_equal(a[0]["idx"], c[0]["idx"])
    assert a[0]["idx"].dtype == np.int32 and a[0]["x"].shape == (8, 3)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 40), batch=st.integers(1, 12), stop=st.integers(0, 12),
       drop=st.booleans(), shuffle=st.booleans())
def test_set_state_resumes_the_uninterrupted_stream(n, batch, stop, drop, shuffle):
    if drop and batch > n:
        return
    kwargs = dict(seed=1, shuffle=shuffle, drop_remainder=drop, transform=_add_noise)
    full = _take(BatchIterator(_Range(n), batch, **kwargs), stop + 4)
    first = BatchIterator(_Range(n), batch, **kwargs)
    _take(first, stop)
    state = first.get_state()
    assert state == {"position": stop}
    resumed = BatchIterator(_Range(n), batch, **kwargs)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 4), full[stop:])
    _assert_batches_equal([resumed.batch_at(stop)], [full[stop]])


def test_process_slices_partition_the_global_batch():
    global_batches = _take(BatchIterator(_Range(30), 8, seed=5), 6)
    per_process = [_take(BatchIterator(_Range(30), 8, seed=5, process_index=p, process_count=4), 6)
                   for p in range(4)]
    for b, global_batch in enumerate(global_batches):
        parts = [per_process[p][b]["idx"] for p in range(4)]
        assert all(part.shape == (2,) for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), global_batch["idx"])
    with pytest.raises(ValueError, match="divisible by process_count=3"):
        BatchIterator(_Range(30), 8, seed=0, process_count=3)


def test_epoch_boundaries_and_eval_pass():
    n, batch = 10, 4
    it = BatchIterator(_Range(n), batch, seed=2)  # drop_remainder: 2 batches per epoch
    assert it.batches_per_epoch == 2
    idx = [b["idx"] for b in _take(it, 4)]
    for epoch in (0, 1):
        perm = np.random.default_rng([2, epoch]).permutation(n)
        np.testing.assert_array_equal(np.concatenate(idx[2 * epoch:2 * epoch + 2]), perm[:8])
    assert not np.array_equal(idx[0], idx[2])

    ordered = BatchIterator(_Range(n), batch, seed=0, shuffle=False, drop_remainder=False)
    passes = [list(ordered.epoch_batches()) for _ in range(2)]
    # The whole split: the last batch is filled with copies of the last example, marked invalid.
    assert [b["idx"].tolist() for b in passes[0]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
    assert [b["valid"].tolist() for b in passes[0]] == [[True] * 4, [True] * 4,
                                                         [True, True, False, False]]
    _assert_batches_equal(passes[0], passes[1])
    assert ordered.get_state() == {"position": 0}  # epoch_batches leaves the stream alone

    shuffled = BatchIterator(_Range(n), batch, seed=0, drop_remainder=False)
    seen = np.concatenate([b["idx"][b["valid"]] for b in shuffled.epoch_batches(epoch=3)])
    assert sorted(seen.tolist()) == list(range(n))
    with pytest.raises(ValueError, match="not one batch"):
        BatchIterator(_Range(3), 4, seed=0)


def test_eval_fill_is_split_between_processes_like_any_batch():
    # 10 examples, batch 4, 2 processes: the last global batch is positions 8, 9, fill, fill;
    # process 0 holds 8 and 9, process 1 only fill.
    parts = [list(BatchIterator(_Range(10), 4, seed=0, shuffle=False, drop_remainder=False,
                                process_index=p, process_count=2).epoch_batches()) for p in (0, 1)]
    assert [b["valid"].tolist() for b in parts[0]] == [[True, True]] * 3
    assert [b["valid"].tolist() for b in parts[1]] == [[True, True]] * 2 + [[False, False]]
    assert parts[1][2]["idx"].tolist() == [9, 9]  # a real example keeps transforms valid


@pytest.mark.parametrize("loader", [dict(num_threads=2), dict(num_workers=2)])
def test_parallel_loading_gives_the_same_stream_and_resumes(loader):
    kwargs = dict(seed=1, transform=_add_noise)
    serial = _take(BatchIterator(_Range(23), 4, **kwargs), 9)
    parallel = BatchIterator(_Range(23), 4, **kwargs, **loader, prefetch=3)
    _assert_batches_equal(_take(parallel, 5), serial[:5])
    assert parallel.get_state() == {"position": 5}  # prefetched batches are not consumed
    resumed = BatchIterator(_Range(23), 4, **kwargs, **loader)
    resumed.set_state(parallel.get_state())
    _assert_batches_equal(_take(resumed, 4), serial[5:])
    evaluated = list(BatchIterator(_Range(23), 4, seed=1, drop_remainder=False,
                                   **loader).epoch_batches(epoch=2))
    _assert_batches_equal(evaluated, list(BatchIterator(_Range(23), 4, seed=1,
                                                        drop_remainder=False).epoch_batches(2)))
    parallel.close()
    resumed.close()


def test_transform_rng_is_seeded_by_the_global_example_position():
    def tag(example, rng):
        return {**example, "u": np.float64(rng.random())}

    n, batch, seed = 10, 4, 7
    it = BatchIterator(_Range(n), batch, seed=seed, transform=tag, process_index=1, process_count=2)
    for position in range(5):  # crosses two epoch boundaries
        out = next(it)
        epoch, b = divmod(position, 2)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        positions = [b * batch + 2 + k for k in range(2)]  # process 1 holds the second half
        np.testing.assert_array_equal(out["idx"], perm[positions])
        expected = [np.random.default_rng([seed, epoch * n + j]).random() for j in positions]
        np.testing.assert_array_equal(out["u"], expected)


def test_batch_iterator_on_embedded_sources():
    for spec in ("digits_video:test", "dtmf_audio:test"):
        source = make_source(spec)
        batch = next(BatchIterator(source, 16, seed=0))
        schema = SCHEMAS[spec.split(":")[0]]
        for key, (shape, dtype) in schema.items():
            assert batch[key].shape == (16, *shape) and batch[key].dtype == dtype


# ---- TFDS ---------------------------------------------------------------------------

def test_tfds_source_under_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=8):
        source = make_source("tfds:mnist:train", feature_map={"image": "image", "label": "label"})
        assert len(source) == 8 and source.modalities == ("image",)
        assert source.class_names == [str(d) for d in range(10)] and source.num_classes == 10
        ex = source[3]
        assert set(ex) == {"image", "label"}
        assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == np.float32
        assert 0.0 <= ex["image"].min() <= ex["image"].max() <= 1.0
        assert ex["label"].dtype == np.int32 and 0 <= ex["label"] < 10
        batch = next(BatchIterator(source, 4, seed=0))
        assert batch["image"].shape == (4, 28, 28, 1) and batch["label"].shape == (4,)
        np.testing.assert_array_equal(source[3]["image"], ex["image"])


def test_tfds_unprepared_dataset_fails_fast_offline(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ValueError) as info:
        make_source("tfds:mnist:train", data_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "'mnist'" in message and str(tmp_path) in message
    assert f"tfds build mnist --data_dir={tmp_path}" in message
    assert not attempts


def test_a_tfds_name_that_does_not_exist_is_not_told_to_tfds_build(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError) as info:
        make_source("tfds:cifar_10:train", data_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "tfds build" not in message
    assert "'cifar_10' is not a TFDS dataset name (closest: cifar10" in message
