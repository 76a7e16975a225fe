"""moe_jax.data.transforms and moe_jax.data.spectrogram on hand-made examples.

Expected values are worked out by hand in comments, or come from Pillow, scipy,
`tokenizers` or a plain numpy formula written out here, never from the transforms.
"""
import io

import numpy as np
import pytest
from PIL import Image

from moe_jax.data import spectrogram
from moe_jax.data.transforms import (TRANSFORMS, Pipeline, TransformError, build_transforms,
                                     split_spec)


def _rng(k=0):
    return np.random.default_rng(k)


def _run(spec, example, *, training=False, seed=0, class_names=()):
    return build_transforms(spec, training=training, class_names=class_names)(example, _rng(seed))


def _make(name, *args, training=False, class_names=(), **kwargs):
    return TRANSFORMS.get(name)(*args, **kwargs, training=training, class_names=class_names)


def _png(array, mode):
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


# ---- specs and the pipeline ---------------------------------------------------------

def test_split_spec_string_list_and_dict_forms():
    assert split_spec("decode_image|resize(36)|random_crop(32)|flip") == (
        "decode_image", "resize(36)", "random_crop(32)", "flip")
    assert split_spec(" resize( 36 ) | flip ") == ("resize( 36 )", "flip")
    # '|' inside quotes or brackets belongs to an argument
    assert split_spec("caption(templates=('a|b {}', \"c|d {}\"))|tokenize") == (
        "caption(templates=('a|b {}', \"c|d {}\"))", "tokenize")
    assert split_spec([{"name": "resize", "size": [24, 40], "method": "nearest"}, "flip"]) == (
        "resize(size=[24, 40], method='nearest')", "flip")
    assert split_spec(None) == () == split_spec("") == split_spec([])
    pipeline = build_transforms([{"name": "caption", "templates": ("a {}", "the {}")},
                                 "tokenize(8, key='text')"], training=True)
    assert isinstance(pipeline, Pipeline)
    assert repr(pipeline) == "caption(templates=('a {}', 'the {}'))|tokenize(8, key='text')"
    caption, tokenize = pipeline.steps
    assert caption.templates == ("a {}", "the {}") and caption.training
    assert (tokenize.length, tokenize.key, tokenize.tokenizer) == (8, "text", "bytes")
    resize = build_transforms("resize(size=(24, 40), method='area')", training=False).steps[0]
    assert (resize.size, resize.method, resize.training) == ((24, 40), "area", False)


@pytest.mark.parametrize("spec, words", [
    ("nope", ["unknown transform 'nope'", "registered:", "random_crop"]),
    ("decode_image|resize(36)|blur(3)", ["unknown transform 'blur'"]),
    ("resize(sz=3)", ["'resize(sz=3)'", "sz", "its arguments: size, key, method"]),
    ("resize(1, 2, 3, 4)", ["'resize(1, 2, 3, 4)'", "its arguments: size, key, method"]),
    ("resize(size=big)", ["'resize(size=big)'", "Python literals"]),
    ("resize(open('x'))", ["Python literals"]),
    ("resize(*[3])", ["Python literals"]),
    ("resize(**{'size': 3})", ["resize(**{'size': 3})", "key=value"]),
    ("resize(", ["'resize('", "not of the form name or name(args)"]),
    ("x.resize(3)", ["not of the form name or name(args)"]),
    ("resize(-3)", ["resize", "size=-3", "positive"]),
    ("resize(3, method='lanczos')", ["method='lanczos'"]),
    ("decode_image(channels=2)", ["channels=2"]),
    ("pad_crop", ["exactly one of samples"]),
    ([{"size": 3}], ["has no 'name'"]),
    ([3], ["must be a string"]),
    (["flip", " "], ["must be a string"]),
])
def test_split_spec_errors_are_one_line_and_name_the_problem(spec, words):
    with pytest.raises(ValueError) as e:
        split_spec(spec)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_pipeline_drops_text_left_at_the_end():
    example = {"text": "hi", "name": "cat.png", "raw": b"\x89PNG", "names": np.array(["a", "b"]),
               "blob": np.array(b"xy"), "label": np.int32(3), "image": np.zeros((2, 2, 1))}
    out = _run("tokenize(4)", example)
    assert sorted(out) == ["image", "label", "text", "text_mask"]
    assert out["text"].tolist() == [105, 106, 0, 0]  # "h" = 104, "i" = 105; id = byte + 1
    assert sorted(_run(None, example)) == ["image", "label"]
    assert sorted(example) == ["blob", "image", "label", "name", "names", "raw", "text"]


def test_pipeline_names_the_step_that_failed():
    spec = "caption(templates=('{} and {}',))"
    with pytest.raises(TransformError) as e:  # str.format raises IndexError: one "{}" too many
        _run(spec, {"label": 0}, class_names=("cat",))
    message = str(e.value)
    assert message.startswith(f"transform {spec!r} failed: IndexError") and "\n" not in message
    assert isinstance(e.value.__cause__, IndexError)
    # a TransformError from a step goes through unchanged
    with pytest.raises(TransformError, match=r"^transform resize: the example has no feature "
                                             r"'image'; it has \['label'\]$"):
        _run("resize(4)", {"label": 0})
    assert issubclass(TransformError, ValueError)


# ---- images and video -----------------------------------------------------------------

def test_decode_image_png_rgb_and_gray():
    rgb = _rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    out = _run("decode_image", {"image": _png(rgb, "RGB"), "label": 1})
    assert out["image"].dtype == np.uint8 and out["label"] == 1
    np.testing.assert_array_equal(out["image"], rgb)  # PNG is lossless
    gray = _rng(1).integers(0, 256, (3, 6), dtype=np.uint8)
    out = _run("decode_image(channels=1)", {"image": np.array(_png(gray, "L"))})  # 0-d bytes array
    assert out["image"].shape == (3, 6, 1)
    np.testing.assert_array_equal(out["image"][..., 0], gray)
    # an RGB file with R = G = B decodes to that gray at channels=1, and to 3 copies at channels=3
    grey_rgb = _png(np.repeat(gray[..., None], 3, axis=-1), "RGB")
    np.testing.assert_array_equal(_run("decode_image(channels=1)", {"image": grey_rgb})["image"],
                                  gray[..., None])
    np.testing.assert_array_equal(_run("decode_image", {"image": _png(gray, "L")})["image"],
                                  np.repeat(gray[..., None], 3, axis=-1))


def test_decode_image_errors():
    with pytest.raises(TransformError, match=r"already decoded \(uint8\[4, 5, 3\]\); drop "
                                             r"decode_image"):
        _run("decode_image", {"image": np.zeros((4, 5, 3), np.uint8)})
    with pytest.raises(TransformError, match="is str, expected encoded image bytes"):
        _run("decode_image", {"image": "cat.png"})
    with pytest.raises(TransformError, match="no feature 'image'"):
        _run("decode_image", {"img": b""})


def test_value_range():
    x = np.array([[[0], [51], [255]]], np.uint8)  # 51 / 255 = 0.2
    out = _run("value_range(-1, 1)", {"image": x})["image"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0], [-1.0, -0.6, 1.0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(_run("value_range", {"image": x})["image"][0, :, 0],
                               [0.0, 0.2, 1.0], rtol=0, atol=1e-6)
    unit = np.array([[0.0, 0.25, 1.0]], np.float64)  # floats are taken as [0, 1]
    np.testing.assert_allclose(_run("value_range(2, 4)", {"image": unit})["image"],
                               [[2.0, 2.5, 4.0]], rtol=0, atol=1e-6)
    with pytest.raises(TransformError, match="encoded or text"):
        _run("value_range", {"image": b"\x89PNG"})


def test_resize_shorter_side_matches_pillow():
    image = _rng(2).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    out = _run("resize(10)", {"image": image})["image"]
    assert out.shape == (10, 20, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(image).resize(
        (20, 10), Image.BILINEAR)))
    # portrait, and a side that rounds: 25 * 10 / 15 = 16.67 -> 17
    assert _run("resize(10)", {"image": image.transpose(1, 0, 2)})["image"].shape == (20, 10, 3)
    assert _run("resize(10)", {"image": image[:15, :25]})["image"].shape == (10, 17, 3)
    # exact (height, width); nearest on one channel against Pillow's "L" mode
    out = _run("resize((6, 9), method='nearest')", {"image": image[..., :1]})["image"]
    np.testing.assert_array_equal(out[..., 0], np.asarray(Image.fromarray(image[..., 0]).resize(
        (9, 6), Image.NEAREST)))
    unchanged = {"image": image}
    assert _run("resize((20, 40))", unchanged)["image"] is image


def test_resize_float_area_is_the_block_mean():
    image = _rng(3).random((8, 12, 2))  # float64, two channels (no Pillow mode): per channel
    out = _run("resize((4, 6), method='area')", {"image": image})["image"]
    assert out.dtype == np.float32 and out.shape == (4, 6, 2)
    block_mean = image.reshape(4, 2, 6, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(out, block_mean, rtol=1e-5, atol=1e-6)


def test_center_crop_picks_the_central_window():
    image = np.arange(30).reshape(5, 6, 1)
    # 5x6 -> 3x3: top = (5 - 3) // 2 = 1, left = (6 - 3) // 2 = 1
    out = _run("center_crop(3)", {"image": image})["image"]
    assert out[..., 0].tolist() == [[7, 8, 9], [13, 14, 15], [19, 20, 21]]
    # (2, 4): top = 1, left = 1
    out = _run("center_crop((2, 4))", {"image": image})["image"]
    assert out[..., 0].tolist() == [[7, 8, 9, 10], [13, 14, 15, 16]]


def test_random_crop_covers_every_window_in_training_and_is_central_at_eval():
    image = np.arange(30).reshape(5, 6, 1)  # the top-left value 6 * top + left names the window
    crop = _make("random_crop", 3, training=True)
    seen = set()
    for k in range(300):
        out = crop({"image": image}, _rng(k))["image"]
        top, left = divmod(int(out[0, 0, 0]), 6)
        np.testing.assert_array_equal(out, image[top:top + 3, left:left + 3])
        seen.add((top, left))
    assert seen == {(t, l) for t in range(3) for l in range(4)}  # 3 x 4 positions
    for k in range(5):
        np.testing.assert_array_equal(
            _run("random_crop(3)", {"image": image}, seed=k)["image"],
            image[1:4, 1:4])  # = center_crop(3), worked out above


def test_crop_larger_than_the_image_fails():
    for spec in ("center_crop(6)", "random_crop((3, 7))"):
        for training in (False, True):
            with pytest.raises(TransformError, match="is 5x6, smaller than the crop"):
                _run(spec, {"image": np.zeros((5, 6, 3))}, training=training)
    with pytest.raises(TransformError, match=r"float64\[5, 6\], expected an image"):
        _run("center_crop(2)", {"image": np.zeros((5, 6))})


def test_flip_only_while_training():
    image = np.arange(12).reshape(2, 3, 2)
    flipped = image[:, ::-1]  # columns reversed, channels kept
    np.testing.assert_array_equal(_run("flip(p=1.0)", {"image": image}, training=True)["image"],
                                  flipped)
    for k in range(20):
        np.testing.assert_array_equal(
            _run("flip(p=1.0)", {"image": image}, seed=k)["image"], image)
        np.testing.assert_array_equal(
            _run("flip(p=0.0)", {"image": image}, training=True, seed=k)["image"], image)
    outcomes = {_run("flip", {"image": image}, training=True, seed=k)["image"][0, 0, 0]
                for k in range(40)}
    assert outcomes == {0, 4}  # p = 0.5: both happen (first pixel 0, or 4 once flipped)


def test_video_frames_share_one_crop_and_one_flip():
    base = np.arange(42).reshape(6, 7, 1)
    video = np.stack([base + 100 * t for t in range(3)])  # [T=3, 6, 7, 1]
    spec = "random_crop(4, key='video')|flip(key='video', p=1.0)"
    windows = set()
    for k in range(30):
        out = _run(spec, {"video": video}, training=True, seed=k)["video"]
        assert out.shape == (3, 4, 4, 1)
        top, left = divmod(int(out[0, 0, -1, 0]), 7)  # flipped: the window's top-left is last
        windows.add((top, left))
        for t in range(3):
            window = (base + 100 * t)[top:top + 4, left:left + 4]
            np.testing.assert_array_equal(out[t], window[:, ::-1])
    assert len(windows) > 3
    video = video.astype(np.uint8)
    small = _run("resize((3, 4), key='video', method='nearest')", {"video": video})["video"]
    for t in range(3):
        frame = Image.fromarray(video[t, ..., 0]).resize((4, 3), Image.NEAREST)
        np.testing.assert_array_equal(small[t, ..., 0], np.asarray(frame))


def test_normalize_per_channel():
    x = np.ones((2, 2, 3), np.uint8)
    out = _run("normalize(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))", {"image": x})["image"]
    # (1 - 0.1) / 0.5 = 1.8, (1 - 0.2) / 0.25 = 3.2, (1 - 0.3) / 2 = 0.35
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to([1.8, 3.2, 0.35], (2, 2, 3)), rtol=1e-6)
    # defaults mean = std = 0.5: (1 - 0.5) / 0.5 = 1
    np.testing.assert_allclose(_run("normalize", {"image": x})["image"], np.ones((2, 2, 3)))
    with pytest.raises(TransformError, match="mean/std have 2/1 values but feature 'image' has 3"):
        _run("normalize(mean=(0.1, 0.2), std=1.0)", {"image": x})
    with pytest.raises(ValueError, match="must be positive"):
        split_spec("normalize(std=(1.0, 0.0, 1.0))")


def test_sample_frames():
    video = np.arange(10).reshape(10, 1, 1, 1) * np.ones((1, 2, 2, 1))  # frame t is all t

    def frames(spec, clip, **kw):
        return _run(spec, {"video": clip}, **kw)["video"][:, 0, 0, 0].astype(int).tolist()

    # 3 frames 2 apart span 5 of 10: slack 5, the central start is 5 // 2 = 2
    assert frames("sample_frames(3, stride=2)", video) == [2, 4, 6]
    starts = {frames("sample_frames(3, stride=2)", video, training=True, seed=k)[0]
              for k in range(60)}
    assert starts == {0, 1, 2, 3, 4, 5}
    for k in range(5):
        start = frames("sample_frames(3, stride=2)", video, training=True, seed=k)[0]
        assert frames("sample_frames(3, stride=2)", video, training=True, seed=k) == [
            start, start + 2, start + 4]
    # a 4-frame clip is shorter than the span: start 0, frame 4 does not exist -> frame 3
    assert frames("sample_frames(3, stride=2)", video[:4]) == [0, 2, 3]
    assert frames("sample_frames(3, stride=2)", video[:4], training=True, seed=3) == [0, 2, 3]
    assert frames("sample_frames(4)", video[:2]) == [0, 1, 1, 1]
    assert _run("sample_frames(2)", {"video": video})["video"].shape == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="must be >= 1"):
        split_spec("sample_frames(0)")


# ---- audio ------------------------------------------------------------------------------

def test_audio_to_float():
    def to_float(x):
        out = _run("audio_to_float", {"audio": x})["audio"]
        assert out.dtype == np.float32
        return out.tolist()

    assert to_float(np.array([-32768, 16384, 0, -8192], np.int16)) == [-1.0, 0.5, 0.0, -0.25]
    assert to_float(np.array([0, 128, 192, 255], np.uint8)) == [-1.0, 0.0, 0.5, 127 / 128]
    assert to_float(np.array([-2**31, 2**30], np.int32)) == [-1.0, 0.5]
    # stereo [samples, 2] -> mean of the channels: (0.5 - 0.5) / 2, (0.5 + 0) / 2
    assert to_float(np.array([[16384, -16384], [16384, 0]], np.int16)) == [0.0, 0.25]
    assert to_float(np.array([0.25, -0.5], np.float64)) == [0.25, -0.5]
    with pytest.raises(TransformError, match="expected a waveform"):
        _run("audio_to_float", {"audio": np.zeros((2, 2, 2), np.int16)})


def test_resample_halves_the_rate_and_keeps_a_low_sine():
    from scipy.signal import resample_poly

    t = np.arange(1600) / 16000.0
    x = np.sin(2 * np.pi * 250.0 * t).astype(np.float32)  # 0.1 s of 250 Hz
    out = _run("resample(16000, 8000)", {"audio": x})["audio"]
    assert out.dtype == np.float32 and out.shape == (800,)
    np.testing.assert_allclose(out, resample_poly(x.astype(np.float64), 1, 2), atol=1e-5)
    # away from the filter's edge effects it is the same sine sampled at 8 kHz
    t8 = np.arange(800) / 8000.0
    np.testing.assert_allclose(out[100:-100], np.sin(2 * np.pi * 250.0 * t8)[100:-100], atol=1e-2)
    assert _run("resample(16000, 16000)", {"audio": x})["audio"] is x
    # 44.1 kHz -> 16 kHz: up 160, down 441; ceil(441 * 160 / 441) = 160
    out = _run("resample(44100, 16000)", {"audio": np.zeros(441, np.float32)})
    assert out["audio"].shape == (160,)
    with pytest.raises(TransformError, match="add audio_to_float first"):
        _run("resample(16000, 8000)", {"audio": np.zeros((10, 2), np.float32)})
    with pytest.raises(ValueError, match="must be positive"):
        split_spec("resample(0, 8000)")


def test_pad_crop_pads_with_zeros_and_a_mask():
    out = _run("pad_crop(8)", {"audio": np.arange(1, 6, dtype=np.float32)})
    assert out["audio"].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert out["audio_mask"].tolist() == [True] * 5 + [False] * 3
    assert out["audio"].dtype == np.float32
    # an existing mask is carried along; stereo pads along samples only
    out = _run("pad_crop(7)", {"audio": np.ones((5, 2), np.int16),
                               "audio_mask": np.array([1, 1, 1, 0, 0], bool)})
    assert out["audio"].shape == (7, 2) and out["audio"].dtype == np.int16
    assert out["audio"][:, 0].tolist() == [1] * 5 + [0] * 2
    assert out["audio_mask"].tolist() == [True] * 3 + [False] * 4
    # 0.5 s at 16 Hz is 8 samples
    out = _run("pad_crop(seconds=0.5, sample_rate=16)", {"audio": np.ones(3, np.float32)})
    assert out["audio_mask"].tolist() == [True] * 3 + [False] * 5
    # 0.29 s at 100 Hz is 29 samples, though 0.29 * 100 = 28.999999999999996 in floats
    out = _run("pad_crop(seconds=0.29, sample_rate=100)", {"audio": np.ones(3, np.float32)})
    assert out["audio"].shape == (29,)


def test_pad_crop_crops_centrally_at_eval_and_randomly_in_training():
    x = np.arange(10, dtype=np.float32)
    out = _run("pad_crop(4)", {"audio": x})  # start (10 - 4) // 2 = 3
    assert out["audio"].tolist() == [3, 4, 5, 6] and out["audio_mask"].all()
    starts = set()
    for k in range(80):
        out = _run("pad_crop(4)", {"audio": x}, training=True, seed=k)
        start = int(out["audio"][0])
        assert out["audio"].tolist() == [start, start + 1, start + 2, start + 3]
        starts.add(start)
    assert starts == set(range(7))
    mask = np.arange(10) < 6  # the mask is cropped with the samples
    out = _run("pad_crop(4)", {"audio": x, "audio_mask": mask})
    assert out["audio_mask"].tolist() == [True, True, True, False]
    assert _run("pad_crop(10)", {"audio": x})["audio"].tolist() == x.tolist()


@pytest.mark.parametrize("spec, words", [
    ("pad_crop", "exactly one of samples"),
    ("pad_crop(8, seconds=1.0, sample_rate=8)", "exactly one of samples"),
    ("pad_crop(seconds=1.0)", "needs sample_rate"),
    ("pad_crop(0)", "must be >= 1"),
    ("pad_crop(seconds=0.01, sample_rate=40)", "must be >= 1"),  # round(0.4) = 0 samples
])
def test_pad_crop_argument_errors(spec, words):
    with pytest.raises(ValueError, match=words):
        split_spec(spec)


def test_log_mel_shape_and_frame_mask():
    # 1000 real samples padded to 1700: 1 + (1700 - 400) // 160 = 9 frames starting at
    # 0, 160, ..., 1280; those wholly inside the clip (start + 399 < 1000: 0 ... 480, 4
    # frames) are real
    x = _rng(4).standard_normal(1000).astype(np.float32)
    out = _run("pad_crop(1700)|log_mel(num_mels=10)", {"audio": x})
    assert out["audio"].shape == (9, 10) and out["audio"].dtype == np.float32
    assert out["audio_mask"].tolist() == [True] * 4 + [False] * 5
    # a clip shorter than one window still has its first frame
    out = _run("pad_crop(1700)|log_mel(num_mels=10)", {"audio": x[:100]})
    assert out["audio_mask"].tolist() == [True] + [False] * 8
    # without pad_crop there is no mask; N = 1000 -> 1 + 600 // 160 = 4 frames
    out = _run("log_mel(n_fft=400, hop=160, num_mels=10)", {"audio": x})
    assert out["audio"].shape == (4, 10) and "audio_mask" not in out


def test_log_mel_puts_a_sine_in_its_band():
    # 20 bands from 0 to 8 kHz: edges equally spaced in HTK mel, 2595 log10(1 + f / 700)
    mel_edges = np.linspace(0.0, 2595.0 * np.log10(1.0 + 8000.0 / 700.0), 22)
    hz_edges = 700.0 * (10.0 ** (mel_edges / 2595.0) - 1.0)
    for band in (4, 10, 15):
        freq = hz_edges[band + 1]  # the centre of band `band`
        wave = np.sin(2 * np.pi * freq * np.arange(4096) / 16000.0).astype(np.float32)
        mel = _run("log_mel(n_fft=512, hop=256, num_mels=20)", {"audio": wave})["audio"]
        assert mel.shape == (1 + (4096 - 512) // 256, 20)
        assert (mel.argmax(axis=1) == band).all()
        far = np.delete(np.arange(20), [band - 1, band, band + 1])
        assert (mel[:, band] > mel[:, far].max(axis=1) + 5.0).all()  # e^5 = 150x the power


def test_log_mel_errors():
    with pytest.raises(TransformError, match="int16 PCM; add audio_to_float before log_mel"):
        _run("log_mel", {"audio": np.zeros(1000, np.int16)})
    with pytest.raises(TransformError, match="shorter than n_fft=400; add pad_crop"):
        _run("log_mel", {"audio": np.zeros(399, np.float32)})
    with pytest.raises(TransformError, match="mono waveform"):
        _run("log_mel", {"audio": np.zeros((1000, 2), np.float32)})
    for spec in ("log_mel(f_max=9000)", "log_mel(f_min=100, f_max=50)", "log_mel(f_min=-1)"):
        with pytest.raises(ValueError, match="f_min < f_max <= sample_rate / 2"):
            split_spec(spec)
    with pytest.raises(ValueError, match="n_fft >= 2"):
        split_spec("log_mel(hop=0)")


def _numpy_log_mel(wave, *, sample_rate, n_fft, hop, num_mels, f_min, f_max, eps):
    """Straightforward float64 log-mel: a loop over frames and a loop-built HTK filterbank."""
    window = np.hanning(n_fft + 1)[:-1]  # periodic Hann
    window = window / window.sum()
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    step = (mel(f_max) - mel(f_min)) / (num_mels + 1)
    bank = np.zeros((num_mels, n_fft // 2 + 1))
    for m in range(num_mels):
        lo, mid, hi = (hz(mel(f_min) + (m + j) * step) for j in range(3))
        for k in range(n_fft // 2 + 1):
            f = k * sample_rate / n_fft
            if lo <= f <= mid:
                bank[m, k] = (f - lo) / (mid - lo)
            elif mid < f <= hi:
                bank[m, k] = (hi - f) / (hi - mid)
    rows = []
    for start in range(0, len(wave) - n_fft + 1, hop):
        spectrum = np.fft.rfft(wave[start:start + n_fft].astype(np.float64) * window)
        rows.append(np.log(eps + bank @ np.abs(spectrum) ** 2))
    return np.array(rows)


@pytest.mark.parametrize("n, n_fft, hop, num_mels, f_min, f_max", [
    (1000, 256, 100, 12, 50.0, 7000.0),  # 1 + 744 // 100 = 8 frames
    (900, 400, 160, 16, 0.0, 8000.0),    # 1 + 500 // 160 = 4 frames
])
def test_spectrogram_log_mel_matches_numpy(n, n_fft, hop, num_mels, f_min, f_max):
    wave = _rng(5).standard_normal(n).astype(np.float32)
    kw = dict(sample_rate=16000, n_fft=n_fft, hop=hop, num_mels=num_mels, f_min=f_min,
              f_max=f_max, eps=1e-6)
    out = spectrogram.log_mel(wave, **kw)
    expected = _numpy_log_mel(wave, **kw)
    assert out.shape == expected.shape == (1 + (n - n_fft) // hop, num_mels)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # a batch of clips [..., N] gives each clip's spectrogram
    batch = np.stack([wave, 2 * wave])
    np.testing.assert_allclose(spectrogram.log_mel(batch, **kw)[1],
                               _numpy_log_mel(2 * wave, **kw), rtol=1e-4, atol=1e-4)
    # and the transform is the same computation
    transform = "log_mel(sample_rate=16000, n_fft={}, hop={}, num_mels={}, f_min={}, f_max={})"
    np.testing.assert_allclose(
        _run(transform.format(n_fft, hop, num_mels, f_min, f_max), {"audio": wave})["audio"],
        expected, rtol=1e-4, atol=1e-4)


def test_padding_at_the_end_never_changes_earlier_frames():
    kw = dict(sample_rate=16000, n_fft=400, hop=160, num_mels=16, f_min=0.0, f_max=8000.0)
    x = _rng(6).standard_normal(1000).astype(np.float32)  # 4 frames
    alone = spectrogram.log_mel(x, **kw)
    for pad in (1, 159, 160, 700):
        padded = spectrogram.log_mel(np.concatenate([x, np.zeros(pad, np.float32)]), **kw)
        assert padded.shape[0] == 1 + (1000 + pad - 400) // 160
        np.testing.assert_allclose(padded[:4], alone, rtol=1e-6, atol=1e-6)


def test_real_frames_do_not_depend_on_the_pad_length():
    # 1000 samples, n_fft 400, hop 160: the frames wholly inside the clip start at 0, 160,
    # 320, 480 (480 + 399 < 1000): 4 real frames at every length >= 1000, holding the same
    # samples, and standardize sees only them. (Counting frames that merely start inside
    # would give 6 real frames at length 1200 and 7 at 2400.)
    x = _rng(7).standard_normal(1000).astype(np.float32)
    outs = [_run(f"pad_crop({length})|log_mel(num_mels=16)|standardize", {"audio": x})
            for length in (1000, 1200, 2400)]
    assert [o["audio"].shape for o in outs] == [(4, 16), (6, 16), (13, 16)]
    assert [o["audio_mask"].sum() for o in outs] == [4, 4, 4]
    for out in outs[1:]:
        np.testing.assert_allclose(out["audio"][:4], outs[0]["audio"], rtol=1e-5, atol=1e-5)
        assert (out["audio"][4:] == 0).all()
    real = outs[0]["audio"]
    np.testing.assert_allclose([real.mean(), real.std()], [0.0, 1.0], atol=1e-4)


def test_standardize_dataset_stats_and_per_example_over_real_rows():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = _run("standardize(mean=2.0, std=0.5)", {"audio": x})["audio"]
    assert out.dtype == np.float32 and out.tolist() == [[-2.0, 0.0], [2.0, 4.0]]
    mask = np.array([True, True, False])
    x = np.array([[1.0, 3.0], [5.0, 7.0], [100.0, -100.0]])
    out = _run("standardize(mean=2.0, std=0.5)", {"audio": x, "audio_mask": mask})["audio"]
    assert out.tolist() == [[-2.0, 2.0], [6.0, 10.0], [0.0, 0.0]]
    # per example: real values 1, 3, 5, 7 have mean 4 and (population) std sqrt(5)
    out = _run("standardize", {"audio": x, "audio_mask": mask})
    np.testing.assert_allclose(out["audio"], np.array([[-3.0, -1.0], [1.0, 3.0], [0.0, 0.0]])
                               / (np.sqrt(5.0) + 1e-5), rtol=1e-6)
    assert out["audio_mask"] is mask
    # no mask: every row is real; no real row: all zeros
    np.testing.assert_allclose(_run("standardize(eps=0.0)", {"audio": x[:2]})["audio"],
                               np.array([[-3.0, -1.0], [1.0, 3.0]]) / np.sqrt(5.0), rtol=1e-6)
    out = _run("standardize", {"audio": x, "audio_mask": np.zeros(3, bool)})["audio"]
    assert out.shape == (3, 2) and (out == 0).all()
    for spec, words in (("standardize(mean=1.0)", "both mean and std"),
                        ("standardize(mean=1.0, std=0.0)", "must be positive")):
        with pytest.raises(ValueError, match=words):
            split_spec(spec)


# ---- text -------------------------------------------------------------------------------

def test_tokenize_bytes():
    out = _run("tokenize(5)", {"text": "hi"})
    assert out["text"].dtype == np.int32
    assert out["text"].tolist() == [105, 106, 0, 0, 0]  # "h" = 104, "i" = 105; id = byte + 1
    assert out["text_mask"].tolist() == [True, True, False, False, False]
    out = _run("tokenize(3)", {"text": "hello"})  # truncated: h e l
    assert out["text"].tolist() == [105, 102, 109] and out["text_mask"].all()
    for value in (b"hi", np.array(b"hi"), np.bytes_(b"hi"), np.array("hi")):
        assert _run("tokenize(3)", {"text": value})["text"].tolist() == [105, 106, 0]
    assert _run("tokenize(3)", {"text": "é"})["text"].tolist() == [0xC3 + 1, 0xA9 + 1, 0]
    out = _run("tokenize(4, key='caption', pad_id=7)", {"caption": "a", "text": "keep"})
    assert out["caption"].tolist() == [98, 7, 7, 7]
    assert out["caption_mask"].tolist() == [True, False, False, False] and "text_mask" not in out
    assert _run("tokenize(2)", {"text": ""})["text_mask"].tolist() == [False, False]
    with pytest.raises(TransformError, match=r"feature 'text' is int64\[2\], expected a string"):
        _run("tokenize(4)", {"text": np.array([1, 2])})
    with pytest.raises(TransformError, match=r"feature 'text' is int64\[\], expected a string"):
        _run("tokenize(4)", {"text": 3})
    with pytest.raises(ValueError, match="length=0 must be >= 1"):
        split_spec("tokenize(0)")


def test_tokenize_with_a_hugging_face_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "the": 2, "cat": 3, "sat": 4, ".": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "tokenizer.json")
    tokenizer.save(path)
    spec = f"tokenize(6, tokenizer={path!r})"
    # Whitespace splits "sat." into "sat" and "."; "dog" is unknown
    out = _run(spec, {"text": "the cat sat. dog"})
    assert out["text"].tolist() == [2, 3, 4, 5, 1, 0]
    assert out["text_mask"].tolist() == [True] * 5 + [False]
    out = _run(f"tokenize(3, tokenizer={path!r}, pad_id=9)", {"text": b"cat"})
    assert out["text"].tolist() == [3, 9, 9] and out["text_mask"].tolist() == [True, False, False]
    out = _run(f"tokenize(2, tokenizer={path!r})", {"text": "the cat sat"})
    assert out["text"].tolist() == [2, 3] and out["text_mask"].all()
    with pytest.raises(ValueError, match="does not exist"):
        split_spec(f"tokenize(4, tokenizer={str(tmp_path / 'missing.json')!r})")


def test_caption_eval_first_template_training_random():
    names = ("cat", "dog")
    templates = ("a photo of {}", "a {name} picture", "{name}s")

    def caption(label, *, training=False, seed=0, **kw):
        step = _make("caption", templates, training=training, class_names=names, **kw)
        return step({"label": label}, _rng(seed))

    assert caption(np.int32(1))["text"] == "a photo of dog"
    assert caption(0, seed=5)["text"] == "a photo of cat"
    captions = [caption(1, training=True, seed=k)["text"] for k in range(30)]
    assert set(captions) == {"a photo of dog", "a dog picture", "dogs"}
    assert captions == [caption(1, training=True, seed=k)["text"] for k in range(30)]  # seeded
    assert _make("caption", "{name}s", key="prompt", class_names=names)(
        {"label": 0}, _rng())["prompt"] == "cats"
    # in a pipeline the caption is text, so it only survives once tokenized
    assert "text" not in _run("caption", {"label": 1}, class_names=names)
    out = _run("caption|tokenize(16)", {"label": 1}, class_names=names)
    assert out["text"][:len("a photo of dog")].tolist() == [b + 1 for b in b"a photo of dog"]
    assert out["text_mask"].sum() == len("a photo of dog")


def test_caption_errors():
    with pytest.raises(TransformError, match="no class names"):
        _run("caption", {"label": 0})
    for label in (-1, 2):
        with pytest.raises(TransformError, match=f"label {label} is outside the 2 class names"):
            _run("caption", {"label": label}, class_names=("cat", "dog"))
    with pytest.raises(TransformError, match="no feature 'label'"):
        _run("caption", {"y": 0}, class_names=("cat",))
    with pytest.raises(ValueError, match="must be strings"):
        split_spec("caption(templates=(1, 2))")


# ---- features ---------------------------------------------------------------------------

def _features():
    return {"audio": np.zeros(4), "audio_mask": np.ones(4, bool), "label": np.int32(2),
            "image": np.ones((2, 2, 1))}


def test_keep_drop_rename():
    example = _features()
    out = _run("keep('audio', 'label')", example)
    assert sorted(out) == ["audio", "audio_mask", "label"] and out["audio"] is example["audio"]
    assert sorted(_run("keep('image')", example)) == ["image"]
    assert sorted(_run("drop('image', 'nothing')", example)) == ["audio", "audio_mask", "label"]
    assert sorted(_run("drop('audio')", example)) == ["image", "label"]  # its mask goes too
    out = _run("rename(audio='spectrogram', label='y')", example)
    assert sorted(out) == ["image", "spectrogram", "spectrogram_mask", "y"]
    assert out["spectrogram"] is example["audio"]
    assert out["spectrogram_mask"] is example["audio_mask"]
    assert sorted(example) == ["audio", "audio_mask", "image", "label"]  # not changed in place
    out = _run("rename(image='video')", example)
    assert sorted(out) == ["audio", "audio_mask", "label", "video"]


def test_feature_errors():
    with pytest.raises(TransformError, match=r"^transform keep: the example has no feature "
                                             r"'text'; it has \['audio', 'audio_mask'"):
        _run("keep('audio', 'text')", _features())
    with pytest.raises(TransformError, match="transform rename: the example has no feature 'text'"):
        _run("rename(text='caption')", _features())
    for spec in ("keep", "drop()", "keep(3)", "rename", "rename(a=1)"):
        with pytest.raises(ValueError, match="give"):
            split_spec(spec)


def test_a_missing_image_decoder_is_one_line(monkeypatch):
    import sys

    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, format="PNG")
    monkeypatch.setitem(sys.modules, "PIL", None)  # as in a venv without Pillow
    with pytest.raises(TransformError) as e:
        _run("decode_image", {"image": png.getvalue()})
    message = str(e.value)
    assert "needs Pillow: pip install pillow" in message and "\n" not in message
